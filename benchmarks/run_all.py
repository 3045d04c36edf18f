"""`make bench`: run every CPU benchmark in this folder, one after the other, and print their ratios.

Each benchmark is a module run from the repository root, ``python -m benchmarks.NAME`` (see its docstring for
what it measures and its options); this runner passes the quick CPU settings and stops at the first failure.
Results go to docs/ by hand, with command, machine and date.

    .venv/bin/python -m benchmarks.run_all
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # not from benchmarks.common: the runner itself needs no torch

# module in benchmarks/, arguments for the CPU run (kept to a few minutes each on 2 cores)
BENCHMARKS: list[tuple[str, list[str]]] = [
    ("synth_speed", []),
    ("mae_speed", []),
    ("overhead", ["--quick"]),
    ("scaling", ["--quick"]),
    ("data_pipeline", ["--quick"]),
    ("recognition_speed", []),
    ("unified_vs_separate", ["--quick"]),
]


def main() -> int:
    ran = 0
    for name, args in BENCHMARKS:
        if not (REPO / "benchmarks" / f"{name}.py").exists():
            print(f"-- {name}: not present, skipped")
            continue
        print(f"\n== benchmarks.{name} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=REPO)
        print(f"-- {name}: exit {code} in {time.perf_counter() - t0:.0f}s", flush=True)
        if code != 0:
            return code
        ran += 1
    print(f"\n{ran} benchmarks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
