"""Framework overhead: a ``UnifiedModule`` training step under the Lightning Trainer against a plain PyTorch loop
over the same ``nn.Module`` (``module.model``), the same loss computation, the same AdamW (and lr schedule), on
the same pre-generated batches, in one run.

    .venv/bin/python benchmarks/overhead.py [--quick | --smoke] [--threads 2]

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
import itertools
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch

from benchmarks.common import make_random_batch, precollated_loader
from idrecog.lit.unified import UnifiedModule
from idrecog.models.decoder import TaskDecoder
from idrecog.models.encoder import ViTEncoder
from idrecog.tasks.catalogue import default_catalogue


def build_module(img_size: tuple[int, int], depth: int, dec_dim: int, seed: int = 0) -> UnifiedModule:
    """The default CPU config's model (lightning_configs/unified.yaml) at the given encoder depth."""
    torch.manual_seed(seed)
    return UnifiedModule(
        catalogue=default_catalogue().to_dict(),
        encoder=ViTEncoder("vit_tiny_patch16_224", img_size=img_size, depth=depth, drop_path_rate=0.0),
        decoder=TaskDecoder(dim=dec_dim, depth=2, num_heads=4),
        task_options={"detection": {"num_queries": 16}},
        encoder_lr_scale=1.0,
        layer_decay=0.9,
        warmup_steps=100,
    )


def plain_loss(module: UnifiedModule, batch: dict[str, Any]) -> torch.Tensor:
    """What ``UnifiedModule._shared_step`` computes for the gradient, without logging or meters."""
    out = module.model(batch["image"], batch=batch, route="known")
    return module.compute_losses(out, batch)[0]


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
    return [b - a for a, b in itertools.pairwise(ends)]


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.ends.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.ends)]


def time_lightning(module: UnifiedModule, batches: list[dict[str, Any]], default_config: bool) -> list[float]:
    timer = StepTimer()
    loader = precollated_loader(batches)
    with tempfile.TemporaryDirectory() as tmp:
        if default_config:  # lightning_configs/unified.yaml's trainer section, checkpointing aside
            extra: dict[str, Any] = {
                "logger": L.pytorch.loggers.CSVLogger(tmp, name="lightning_logs"),
                "log_every_n_steps": 10,
                "callbacks": [L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"), timer],
            }
        else:
            extra = {
                "logger": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "callbacks": [timer],
            }
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision="32-true",
            max_epochs=1,
            default_root_dir=tmp,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            **extra,
        )
        trainer.fit(module, train_dataloaders=loader)
    return timer.times


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
            module = build_module(size, args.depth, args.dec_dim)
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--img_size", type=int, nargs=2, default=[160, 256])
    p.add_argument("--depth", type=int, default=4, help="encoder depth (default config: 4)")
    p.add_argument("--dec_dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="batch 8, 12 steps, 2 repeats (~1-2 min on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="a tiny setting that only checks the script works")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.repeats = 8, 12, 2
    if args.smoke:
        args.batch, args.steps, args.warmup, args.repeats = 2, 2, 1, 1
        args.img_size, args.depth, args.dec_dim, args.threads = [64, 96], 1, 64, 1
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
