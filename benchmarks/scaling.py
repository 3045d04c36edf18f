"""Scaling with tasks and detection queries: training-step time and peak memory of the unified model as the
number of tasks grows (1, 2, 4, all, in catalogue order) and as the detection queries grow (8, 16, 32, 64), and
the encoder alone (its forward, backward and AdamW step) for the decoder's share of the step, in one run.

    .venv/bin/python -m benchmarks.scaling [--quick | --smoke] [--threads 2]

Step = forward of every task + the same losses as ``UnifiedModule`` + backward + AdamW (a plain loop, so the
framework's overhead, measured by benchmarks.overhead, is left out). Variants alternate in order every repeat; medians
over the kept steps. Peak memory on CPU: each variant runs once more in a fresh subprocess, which reports its
peak ``ru_maxrss`` over two steps minus its resident set before them (Linux ``/proc/self/statm``; model built
and imports done): the step's extra resident memory, activations, gradients and AdamW state included.
On CUDA, ``torch.cuda.max_memory_allocated`` would be the figure; this script targets the CPU config.
Target: each added task costs < 10% of the encoder's step time ((t_all - t_1) / (T - 1) / t_encoder).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO, cpu_parser, make_random_batch, parse_cpu_args, plain_loss, small_unified
from idrecog.lit.optim import make_adamw
from idrecog.tasks.catalogue import TaskCatalogue, default_catalogue


def subset(n: int | None) -> TaskCatalogue:
    full = default_catalogue()
    tasks = full.tasks if n is None else full.tasks[:n]
    return TaskCatalogue(tasks=list(tasks), source=f"first {len(tasks)} tasks")


def make_step(variant: dict[str, Any], args: argparse.Namespace):
    """A zero-argument training step for the variant ({"tasks": n | None, "queries": q} or {"encoder": True})."""
    cat = subset(variant.get("tasks"))
    module = small_unified(
        cat, args.img_size, args.depth, args.dec_dim, det_queries=variant.get("queries", 16)
    )
    module.train()
    g = torch.Generator().manual_seed(0)
    batch = make_random_batch(cat, args.batch, tuple(args.img_size), present_prob=0.8, generator=g)
    if variant.get("encoder"):
        enc = module.model.encoder
        opt = make_adamw([{"params": list(enc.parameters())}], 1e-4, False)

        def loss_fn() -> torch.Tensor:
            return enc(batch["image"]).float().pow(2).mean()
    else:
        opt = make_adamw([{"params": list(module.parameters())}], 1e-4, False)

        def loss_fn() -> torch.Tensor:
            return plain_loss(module, batch)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def label(v: dict[str, Any]) -> str:
    if v.get("encoder"):
        return "encoder alone"
    n = v["tasks"] if v["tasks"] is not None else len(default_catalogue())
    return f"{n} tasks, {v['queries']} det. queries"


def memory_child(variant: dict[str, Any], args: argparse.Namespace) -> float:
    """MiB of resident memory two steps add (run in a fresh process)."""
    step = make_step(variant, args)
    # the current resident set, not ru_maxrss: imports and model building may have peaked higher already
    before = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    step()
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - before


def peak_mib(variant: dict[str, Any], argv: list[str]) -> float:
    cmd = [sys.executable, "-m", "benchmarks.scaling", *argv, "--memory_child", json.dumps(variant)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = cpu_parser(__doc__, batch=16, quick="batch 8, 5 steps, 2 repeats (~2 min on 2 cores)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_memory", action="store_true")
    p.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_cpu_args(
        p,
        raw,
        quick={"batch": 8, "steps": 5, "repeats": 2},
        smoke={"batch": 2, "steps": 1, "warmup": 1, "repeats": 1},
    )
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(f"{memory_child(json.loads(args.memory_child), args):.1f}")
        return 0

    n_all = len(default_catalogue())
    task_sweep = [{"tasks": n, "queries": 16} for n in (1, 2, 4)] + [{"tasks": None, "queries": 16}]
    query_sweep = [{"tasks": None, "queries": q} for q in (8, 32, 64)]  # 16: the last of task_sweep
    if args.smoke:
        task_sweep, query_sweep = [task_sweep[0], task_sweep[-1]], [query_sweep[-1]]
    variants = [{"encoder": True}, *task_sweep, *query_sweep]
    steps = {label(v): make_step(v, args) for v in variants}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.repeats):
        for k in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                steps[k]()
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    child_argv = [a for a in raw if a != "--memory_child"]
    mem = {label(v): (float("nan") if args.no_memory else peak_mib(v, child_argv)) for v in variants}

    enc = med["encoder alone"]
    print(f"\nthreads={args.threads} batch={args.batch} img={tuple(args.img_size)} depth={args.depth}")
    print(f"steps={args.steps} x{args.repeats} (warm-up {args.warmup} dropped)\n")
    print("| variant | ms/step (median) | vs encoder alone | step peak extra RSS (MiB) |")
    print("|---|---|---|---|")
    for v in variants:
        k = label(v)
        print(f"| {k} | {med[k]:.1f} | {med[k] / enc:.2f}x | {mem[k]:.0f} |")
    first, last = label(task_sweep[0]), label(task_sweep[-1])
    n_first = task_sweep[0]["tasks"]
    per_task = (med[last] - med[first]) / (n_all - n_first)
    share = 1.0 - enc / med[last]
    print(f"\ndecoder + heads + losses share of the all-task step: {share:.1%}")
    verdict = "met" if per_task / enc < 0.10 else "NOT met"
    print(
        f"cost per added task: ({med[last]:.1f} - {med[first]:.1f}) / {n_all - n_first} = {per_task:.1f} ms "
        f"= {per_task / enc:.1%} of the encoder's step ({enc:.1f} ms); target < 10%: {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
