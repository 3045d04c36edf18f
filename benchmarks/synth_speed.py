"""Synthetic-benchmark generation speed: samples/s/core for workers=1 and workers=2.

.venv/bin/python -m benchmarks.synth_speed [--samples 200] [--height 160 --width 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from idrecog.synth.generate import generate_dataset


def measure(n: int, workers: int, height: int, width: int) -> tuple[float, float]:
    """(wall-clock samples/s/core, samples per CPU-second of this process and its workers)."""

    def cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), cpu()
        generate_dataset(
            Path(d) / "ds",
            train=n,
            val=0,
            test=0,
            workers=workers,
            height=height,
            width=width,
            progress=False,
        )
        dt, used = time.perf_counter() - t0, cpu() - c0
    return n / dt / workers, n / max(used, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--width", type=int, default=256)
    a = p.parse_args()
    generate_dataset(
        Path(tempfile.mkdtemp()) / "warm", train=2, val=0, test=0, progress=False
    )  # imports, caches
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for workers in (1, 2):
        rate, per_cpu = measure(a.samples, workers, a.height, a.width)
        print(
            f"workers={workers}: {rate:.1f} samples/s/core wall-clock, {per_cpu:.1f} samples per CPU-second "
            f"at {a.height}x{a.width} ({a.samples} samples)"
        )


if __name__ == "__main__":
    main()
