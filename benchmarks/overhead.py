"""Framework overhead: a ``UnifiedModule`` training step under the Lightning Trainer against a plain PyTorch loop
over the same ``nn.Module`` (``module.model``), the same loss computation, the same AdamW (and lr schedule), on
the same pre-generated batches, in one run.

    .venv/bin/python -m benchmarks.overhead [--quick | --smoke] [--threads 2]

Three variants, alternated ``--repeats`` times; each runs ``--warmup`` + ``--steps`` steps and the per-step time
(wall clock between consecutive step ends, so data fetch and hooks are included) of the last ``--steps`` is
kept; the table gives medians over steps and repeats:

* ``plain``: ``for batch in batches: loss = same_loss(model, batch); backward; opt.step; sched.step``;
* ``lightning (default config)``: Trainer settings of lightning_configs/unified.yaml (CSV logger every 10 steps,
  LearningRateMonitor, progress bar, model summary); checkpointing off (it runs at epoch end, not per step);
* ``lightning (bare)``: no logger, no progress bar, no callbacks.

Both Lightning variants run ``UnifiedModule.training_step``, which also updates the per-task loss meters and
calls ``self.log``: that bookkeeping is part of what the framework costs, so it is measured, not removed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch

from benchmarks.common import (
    StepTimer,
    cpu_parser,
    intervals,
    make_random_batch,
    parse_cpu_args,
    plain_loss,
    precollated_loader,
    quiet_trainer,
    small_unified,
)
from idrecog.lit.unified import UnifiedModule
from idrecog.tasks.catalogue import default_catalogue


def time_plain(module: UnifiedModule, batches: list[dict[str, Any]]) -> list[float]:
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    module.train()
    ends = [time.perf_counter()]
    for batch in batches:
        loss = plain_loss(module, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ends.append(time.perf_counter())
    return intervals(ends)


def time_lightning(module: UnifiedModule, batches: list[dict[str, Any]], default_config: bool) -> list[float]:
    timer = StepTimer()
    loader = precollated_loader(batches)
    with tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, Any] = {"callbacks": [timer]}
        if default_config:  # lightning_configs/unified.yaml's trainer section, checkpointing aside
            extra = {
                "logger": L.pytorch.loggers.CSVLogger(tmp, name="lightning_logs"),
                "log_every_n_steps": 10,
                "enable_progress_bar": True,
                "enable_model_summary": True,
                "callbacks": [L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"), timer],
            }
        trainer = L.Trainer(**quiet_trainer("cpu", "32-true", tmp, max_epochs=1, **extra))
        trainer.fit(module, train_dataloaders=loader)
    return timer.step_times


VARIANTS = ("plain", "lightning (default config)", "lightning (bare)")


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    size = (args.img_size[0], args.img_size[1])
    cat = default_catalogue()
    g = torch.Generator().manual_seed(0)
    batches = [
        make_random_batch(cat, args.batch, size, present_prob=0.8, generator=g)
        for _ in range(args.warmup + args.steps)
    ]
    per_variant: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:  # alternate the order against drift
            module = small_unified(cat, size, args.depth, args.dec_dim)
            if v == "plain":
                times = time_plain(module, batches)
            else:
                times = time_lightning(module, batches, default_config=v.endswith("config)"))
            per_variant[v].extend(times[args.warmup :])
    med = {v: statistics.median(ts) for v, ts in per_variant.items()}
    print(f"\nthreads={args.threads} batch={args.batch} img={size} depth={args.depth} steps={args.steps}")
    print(f"x{args.repeats} (warm-up {args.warmup} dropped)\n")
    print("| variant | ms/step (median) | ratio to plain | target |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        ratio = med[v] / med["plain"]
        target = "-" if v == "plain" else ("<= 1.10x: met" if ratio <= 1.10 else "<= 1.10x: NOT met")
        print(f"| {v} | {med[v] * 1e3:.1f} | {ratio:.3f}x | {target} |")
    return {v: med[v] * 1e3 for v in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    p = cpu_parser(__doc__, batch=16, quick="batch 8, 12 steps, 2 repeats (~1-2 min on 2 cores)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    args = parse_cpu_args(
        p,
        argv,
        quick={"batch": 8, "steps": 12, "repeats": 2},
        smoke={"batch": 2, "steps": 2, "warmup": 1, "repeats": 1},
    )
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
