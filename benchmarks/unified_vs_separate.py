"""Unified against separate: one unified model for all T tasks against T single-task models (each a
``UnifiedModule`` whose catalogue holds only its task), same encoder size, same total training budget in steps
(split evenly across the single-task models), same data and seeds, in one run.

    .venv/bin/python -m benchmarks.unified_vs_separate [--quick | --smoke] [--seeds 0 1] [--threads 2]

Data: the synthetic benchmark at 160 x 256 in ``--root`` (generated on first use). Every model is trained by the
Lightning Trainer for its step budget on the same train loader (single-task models see the same collated
batches, cut down to their task) and evaluated on the val split. Reported: each task's primary metric both ways
(mean over seeds), the mean of per-task scores (``score_of``: the primary metric made higher-is-better, MAE as
1 - MAE / range), total parameters, and the inference cost of answering all tasks for one image: FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` and measured ms per image (batch ``--infer_batch``, forward only,
unified and separate alternated, medians). Targets: unified mean score >= separate, and >= (T - 1)x less
inference compute.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import cpu_parser, ensure_dataset, parse_cpu_args, quiet_trainer, small_unified
from idrecog.data.collate import Collator
from idrecog.data.datamodule import IdDataModule
from idrecog.lit.unified import UnifiedModule, score_of
from idrecog.tasks.catalogue import TaskCatalogue


class TaskSlice:
    """Collate with the full catalogue, then keep one task's column (a single-task model's batch contract)."""

    def __init__(self, catalogue: TaskCatalogue, task: str | None) -> None:
        self.collate = Collator(catalogue)
        self.index = None if task is None else catalogue.names.index(task)
        self.task = task

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        batch = self.collate(samples)
        if self.index is not None:
            i = self.index
            batch["present"] = batch["present"][:, i : i + 1]
            batch["applies"] = batch["applies"][:, i : i + 1]
            batch["targets"] = {self.task: batch["targets"][self.task]}
            batch.pop("frames_missing", None)
        return batch


def train_eval(
    dm: IdDataModule, cat: TaskCatalogue, task: str | None, steps: int, args: argparse.Namespace, seed: int
) -> tuple[UnifiedModule, dict[str, float]]:
    sub = cat if task is None else TaskCatalogue(tasks=[cat[task]], source=task)
    L.seed_everything(seed, verbose=False)
    module = small_unified(sub, args.img_size, args.depth, args.dec_dim, seed=seed, warmup_steps=0.1)
    collate = TaskSlice(cat, task)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(dm.datasets["train"], args.batch, shuffle=True, collate_fn=collate, generator=g)
    val = DataLoader(dm.datasets["val"], args.batch, shuffle=False, collate_fn=collate)
    L.Trainer(**quiet_trainer("cpu", "32-true", max_steps=steps)).fit(module, train)
    res = L.Trainer(**quiet_trainer("cpu", "32-true", limit_val_batches=1.0)).validate(
        module, val, verbose=False
    )[0]
    return module, {k: float(v) for k, v in res.items()}


def inference_flops(module: UnifiedModule, images: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        module.model(images[:1])
    return int(fc.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    p = cpu_parser(__doc__, batch=16, quick="48 steps per side, batch 8, encoder depth 2")
    p.add_argument("--root", default="data/bench_synth")
    p.add_argument("--train_samples", type=int, default=256)
    p.add_argument("--val_samples", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=160, help="total training budget (steps) per side")
    p.add_argument("--infer_batch", type=int, default=8)
    args = parse_cpu_args(
        p,
        argv,
        quick={"steps": 48, "batch": 8, "depth": 2},
        smoke={"steps": 8, "batch": 2, "infer_batch": 2, "seeds": [0], "train_samples": 8, "val_samples": 4},
    )
    torch.set_num_threads(args.threads)
    root = ensure_dataset(Path(args.root), args.train_samples, args.val_samples, tuple(args.img_size))
    dm = IdDataModule(root=str(root), img_size=tuple(args.img_size), batch_size=args.batch, augment=True)
    dm.setup("fit")
    cat = dm.catalogue
    t = len(cat)
    per_task_steps = max(1, args.steps // t)

    primary: dict[tuple[str, str], list[float]] = {}
    scores: dict[tuple[str, str], list[float]] = {}
    unified = separate = None
    for seed in args.seeds:
        unified, res = train_eval(dm, cat, None, args.steps, args, seed)
        separate = {}
        for task in cat.names:
            separate[task], res_t = train_eval(dm, cat, task, per_task_steps, args, seed)
            for side, r in (("unified", res), ("separate", res_t)):
                tt = unified.task_types[task]
                key = f"val/{task}/{tt.primary_metric}"
                if key in r:
                    primary.setdefault((task, side), []).append(r[key])
                    scores.setdefault((task, side), []).append(score_of(tt, r[key]))

    # inference: all tasks of one image
    assert unified is not None and separate is not None
    images = torch.randn(args.infer_batch, 3, *args.img_size)
    unified.eval()
    for m in separate.values():
        m.eval()
    flops_u = inference_flops(unified, images)
    flops_s = sum(inference_flops(m, images) for m in separate.values())
    ms: dict[str, list[float]] = {"unified": [], "separate": []}
    with torch.inference_mode():
        for r in range(5):
            for side in ("unified", "separate") if r % 2 == 0 else ("separate", "unified"):
                t0 = time.perf_counter()
                for m in [unified] if side == "unified" else list(separate.values()):
                    m.model(images)
                if r:  # the first round warms up
                    ms[side].append((time.perf_counter() - t0) * 1e3 / args.infer_batch)
    params_u = sum(p.numel() for p in unified.parameters())
    params_s = sum(p.numel() for m in separate.values() for p in m.parameters())

    print(f"\nthreads={args.threads} img={tuple(args.img_size)} depth={args.depth} batch={args.batch}")
    print(f"budget {args.steps} steps per side ({per_task_steps} per single-task model), seeds {args.seeds}")
    print(f"train {len(dm.datasets['train'])} / val {len(dm.datasets['val'])} samples\n")
    print("| task | primary metric | unified | separate |")
    print("|---|---|---|---|")
    mean_u, mean_s = [], []
    for task in cat.names:
        pm = unified.task_types[task].primary_metric
        u, s = primary.get((task, "unified")), primary.get((task, "separate"))
        if not u or not s:
            print(f"| {task} | {pm} | n/a | n/a |")
            continue
        mean_u.append(statistics.mean(scores[(task, "unified")]))
        mean_s.append(statistics.mean(scores[(task, "separate")]))
        print(f"| {task} | {pm} | {statistics.mean(u):.4f} | {statistics.mean(s):.4f} |")
    mu, msep = statistics.mean(mean_u), statistics.mean(mean_s)
    print(f"| **mean score** (higher is better) | score_of | {mu:.4f} | {msep:.4f} |")
    print(f"| parameters | | {params_u / 1e6:.2f} M | {params_s / 1e6:.2f} M |")
    print(f"| inference GFLOPs / image (all tasks) | | {flops_u / 1e9:.3f} | {flops_s / 1e9:.3f} |")
    mu_ms, ms_ms = statistics.median(ms["unified"]), statistics.median(ms["separate"])
    print(f"| inference ms / image (all tasks) | | {mu_ms:.1f} | {ms_ms:.1f} |")
    print(
        f"\naccuracy: unified {mu:.4f} vs separate {msep:.4f}: target unified >= separate: "
        f"{'met' if mu >= msep else 'NOT met'}"
    )
    print(
        f"compute: {flops_s / flops_u:.2f}x fewer FLOPs, {ms_ms / mu_ms:.2f}x less time; target >= {t - 1}x: "
        f"{'met' if flops_s / flops_u >= t - 1 else 'NOT met'} (FLOPs)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
