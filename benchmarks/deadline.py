"""The time-budget guard of the time-boxed benchmarks (mae_transfer.py, task_resolution.py)."""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable


def exit_at(seconds: float, on_expire: Callable[[], None], exit_code: int) -> threading.Timer | None:
    """In ``seconds``: run ``on_expire`` (write what finished), then end the process with ``exit_code``, whatever
    the main thread is doing (a training step, a DataLoader join), so the script ends inside its budget.
    ``None`` (no timer) for an infinite time; cancel the returned timer once the results are written."""
    if not math.isfinite(seconds):
        return None

    def fire() -> None:
        try:
            on_expire()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)

    timer = threading.Timer(max(0.0, seconds), fire)
    timer.daemon = True
    timer.start()
    return timer
