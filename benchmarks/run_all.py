"""`make bench`: run every CPU benchmark in this folder, one after the other, and print their ratios.

Each benchmark is a standalone script (see its docstring for what it measures and its options); this runner
passes the quick CPU settings and stops at the first failure. Results go to docs/ by hand, with command,
machine and date.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# script, arguments for the CPU run (kept to a few minutes each on 2 cores)
BENCHMARKS: list[tuple[str, list[str]]] = [
    ("synth_speed.py", []),
    ("mae_speed.py", []),
    ("overhead.py", ["--quick"]),
    ("scaling.py", ["--quick"]),
    ("data_pipeline.py", ["--quick"]),
    ("recognition_speed.py", []),
    ("unified_vs_separate.py", ["--quick"]),
]


def main() -> int:
    ran = 0
    for script, args in BENCHMARKS:
        path = HERE / script
        if not path.exists():
            print(f"-- {script}: not present, skipped")
            continue
        print(f"\n== {script} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(path), *args])
        print(f"-- {script}: exit {code} in {time.perf_counter() - t0:.0f}s", flush=True)
        if code != 0:
            return code
        ran += 1
    print(f"\n{ran} benchmarks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
