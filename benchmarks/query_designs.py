"""The three task-query designs (learned, text, multimodal) on the synthetic benchmark, same budget, >= 2 seeds.

Each run is ``idrecog fit --config lightning_configs/unified.yaml --model.queries=<design>`` with the same
trainer budget (``--budget`` optimiser steps, validated at the end), then the validation metrics are read back.
Reports hologram and nationality_match accuracy, the other tasks' primary metrics, parameter counts (trainable
and total, the frozen text encoder is not counted: it is not in the model) and training throughput (train
images/s, wall clock). Writes ``OUT/results.json`` and an ``idrecog compare`` report (``OUT/report.md|png``).

    .venv/bin/python benchmarks/query_designs.py --budget 300 --seeds 0 1 --train 2000 --out runs/query_designs
    .venv/bin/python benchmarks/query_designs.py --budget 20 --train 200 --val 100 --img 64 96 --small  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
DESIGNS = ("learned", "text", "multimodal")
TASKS_OF_INTEREST = ("hologram", "nationality_match")


class Throughput(Callback):
    """Train images/s over the training batches (wall clock, first batch excluded as warm-up)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.images = 0
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if batch_idx > 0 and self.t0 is not None:
            self.seconds += time.perf_counter() - self.t0
            self.images += int(batch["image"].shape[0])

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


def run_one(design: str, seed: int, args: argparse.Namespace, data: Path, out: Path) -> dict:
    from idrecog.lit.cli import build_cli

    h, w = args.img
    argv = [
        f"--config={REPO / 'lightning_configs/unified.yaml'}",
        f"--model.queries={design}",
        f"--seed_everything={seed}",
        f"--data.root={data}",
        f"--data.img_size=[{h}, {w}]",
        f"--model.encoder.init_args.img_size=[{h}, {w}]",
        f"--data.batch_size={args.batch_size}",
        "--data.num_workers=0",
        f"--trainer.max_steps={args.budget}",
        "--trainer.max_epochs=-1",
        f"--trainer.val_check_interval={args.budget}",
        "--trainer.check_val_every_n_epoch=null",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out / f'{design}-s{seed}'}",
        "--trainer.enable_progress_bar=false",
        f"--model.warmup_steps={max(1, args.budget // 10)}",
    ]
    if args.small:
        argv += [
            "--model.encoder.init_args.depth=2",
            "--model.decoder.init_args.depth=1",
        ]
    if design == "multimodal":
        argv += [f"--model.queries.image_mode={args.image_mode}"]
    from lightning.pytorch.callbacks import ModelCheckpoint

    cli = build_cli(argv, run=False)
    tp = Throughput()
    cli.trainer.callbacks.append(tp)
    for cb in cli.trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            cb.dirpath = str(out / f"{design}-s{seed}" / "checkpoints")
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    model = cli.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    steps = cli.trainer.global_step
    return {
        "design": design,
        "seed": seed,
        "metrics": metrics,
        "params_trainable": trainable,
        "params_total": total,
        "steps": steps,
        "train_images_per_s": tp.images_per_s,
        "wall_s": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=300, help="optimiser steps per run (same for every design)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--img", type=int, nargs=2, default=[160, 256], metavar=("H", "W"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-mode", default="shared", choices=("shared", "shared_frozen", "separate"))
    ap.add_argument(
        "--small", action="store_true", help="a 2-block encoder and 1-block decoder (CPU smoke runs)"
    )
    ap.add_argument("--data", default=None, help="dataset folder (default: OUT/data, generated)")
    ap.add_argument("--out", default="runs/query_designs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "tasks.yaml").is_file():
        from idrecog.synth.generate import generate_dataset

        h, w = args.img
        generate_dataset(
            data, train=args.train, val=args.val, test=0, height=h, width=w, workers=2, progress=False
        )
    results = []
    for design in args.designs:
        for seed in args.seeds:
            r = run_one(design, seed, args, data, out)
            results.append(r)
            m = r["metrics"]
            print(
                f"{design:<10} seed {seed}: hologram acc {m.get('val/hologram/accuracy', float('nan')):.3f}  "
                f"nationality_match acc {m.get('val/nationality_match/accuracy', float('nan')):.3f}  "
                f"score {m.get('val/score', float('nan')):.3f}  params {r['params_trainable'] / 1e6:.2f}M  "
                f"{r['train_images_per_s']:.1f} img/s",
                flush=True,
            )
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
        f"{torch.get_num_threads()}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "args": vars(args),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2))
    from idrecog.compare import find_runs, write_report

    md, png = write_report(find_runs([out / f"{r['design']}-s{r['seed']}" for r in results]), out / "report")
    print(f"wrote {out / 'results.json'}, {md}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
