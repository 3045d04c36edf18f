"""val/score of every registered loss balancer on the default job, a shortened schedule, several seeds.

    python -m benchmarks.balancers [--steps 47] [--seeds 0 1] [--balancers fixed pcgrad ...] [--out runs/balancers]

Each run is ``idrecog fit`` of lightning_configs/unified.yaml (model, data, optimiser as they are) with
``model.balancing`` set, stopped at ``--steps`` optimiser steps (default 47, a quarter of the default job's
189) with one validation at the end, the warm-up cut in the same proportion (``--warmup``, default 12 of 50),
no checkpoints. Runs go one at a time (each uses the machine's cores); the table (mean over the seeds of
val/score, its spread, the mean step time) is printed and written to OUT/results.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import fit_subprocess, last_val_metrics, step_bounded_config, write_results


def run_one(out: Path, balancer: str, seed: int, steps: int, warmup: int, root: str) -> dict[str, Any]:
    run = out / f"{balancer}_s{seed}"
    over = {"model": {"init_args": {"balancing": balancer, "warmup_steps": warmup}}, "data": {"root": root}}
    cfg = step_bounded_config(run / "config.yaml", run, seed, steps, over)
    try:
        wall = fit_subprocess(cfg, run / "fit.log")
    except RuntimeError as e:
        raise RuntimeError(f"{balancer} seed {seed}: {e}") from None
    return {
        "balancer": balancer,
        "seed": seed,
        "val_score": last_val_metrics(run)["val/score"],
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    from idrecog.lit.balancing import list_balancers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=47)
    p.add_argument("--warmup", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--balancers", nargs="+", default=list_balancers())
    p.add_argument(
        "--root", default="data/synthetic", help="the default job's dataset (generated if missing)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/balancers"))
    args = p.parse_args(argv)
    results: list[dict[str, Any]] = []
    for s in args.seeds:  # seed-major: a cut-short session still has every balancer at the first seed
        for b in args.balancers:
            r = run_one(args.out, b, s, args.steps, args.warmup, args.root)
            print(f"[bench] {b} seed {s}: val/score {r['val_score']:.4f} ({r['wall_s']:.0f} s)", flush=True)
            results.append(r)
            _write(args, results)


def _write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    lines = [
        f"val/score after {args.steps} steps (warm-up {args.warmup}), seeds {args.seeds}",
        "",
        "| balancer | val/score mean | per seed | fit wall s (mean) |",
        "|---|---:|---|---:|",
    ]
    for b in args.balancers:
        rs = [r for r in results if r["balancer"] == b]
        if not rs:
            continue
        per = ", ".join(f"{r['val_score']:.4f}" for r in rs)
        mean = statistics.mean(r["val_score"] for r in rs)
        lines.append(f"| {b} | {mean:.4f} | {per} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
    md = "\n".join(lines)
    print(md, flush=True)
    write_results(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, md)


if __name__ == "__main__":
    main()
