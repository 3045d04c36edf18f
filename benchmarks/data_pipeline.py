"""Data pipeline against the model: samples/s the ``IdDataModule`` delivers (decode, augment, collate, associated
frames, user features) with 0, 1 and 2 workers and ``cache_images`` off/on, against samples/s the default CPU
config's model consumes in training, in one run.

    .venv/bin/python -m benchmarks.data_pipeline [--quick | --smoke] [--root data/bench_synth] [--threads 2]

The dataset is the synthetic benchmark at the default size (160 x 256), generated into ``--root`` on first use
and reused after. Loader rows iterate ``train_dataloader()`` (augmentation on, shuffled) for ``--batches``
batches after one batch of start-up (worker spawn); cached rows run one epoch first so the cache is warm.
The model row is a plain training step (forward, losses, backward, AdamW) of lightning_configs/unified.yaml's
model (tiny ViT depth 4, decoder 128, batch 32: the default config) on pre-collated batches. Loader and model rows alternate; medians.

The DataModule settings (``num_workers``, ``cache_images``, ``persistent_workers``, ``augment``) are read from
``lightning_configs/unified.yaml``; frames are not decoded, as with that config's learned queries (the model
tells the DataModule so at setup).

Verdict: the pipeline is the bottleneck when the config's loader delivers fewer samples/s than the model
consumes, or when training fed by it runs below 0.9x of training on pre-collated batches (workers share the 2
cores with the training step, so the last row runs the real thing).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import (
    UNIFIED_CONFIG,
    cpu_parser,
    ensure_dataset,
    load_yaml,
    parse_cpu_args,
    plain_loss,
    small_unified,
)
from idrecog.data.datamodule import IdDataModule
from idrecog.tasks.catalogue import default_catalogue

DATA_KEYS = ("num_workers", "cache_images", "persistent_workers", "augment")


def config_data() -> dict:
    """The DataModule loader settings of the default config (what `make run` trains with)."""
    data = load_yaml(UNIFIED_CONFIG)["data"]
    defaults = {"num_workers": 0, "cache_images": False, "persistent_workers": False, "augment": True}
    return {k: data.get(k, defaults[k]) for k in DATA_KEYS}


def datamodule(root: Path, args: argparse.Namespace, **loader: object) -> IdDataModule:
    dm = IdDataModule(root=str(root), img_size=tuple(args.img_size), batch_size=args.batch, **loader)
    dm.configure(load_frames=False)  # learned queries read no frames
    return dm


def loader_rate(root: Path, args: argparse.Namespace, workers: int, cache: bool) -> float:
    dm = datamodule(
        root,
        args,
        num_workers=workers,
        persistent_workers=workers > 0,
        cache_images=cache,
        augment=args.cfg["augment"],
    )
    loader = dm.train_dataloader()
    if cache:  # warm the cache (per worker copy: persistent workers keep it)
        for _ in loader:
            pass
    it = iter(itertools.cycle(loader) if cache else loader)
    next(it)  # start-up: worker spawn and the first batch
    n, t0 = 0, time.perf_counter()
    for _ in range(args.batches):
        n += len(next(it)["ids"])
    return n / (time.perf_counter() - t0)


def train_rate(root: Path, args: argparse.Namespace, fed: bool) -> float:
    """Training samples/s; ``fed=False``: pre-collated batches in memory, else the config's DataModule loader."""
    module = small_unified(default_catalogue(), args.img_size, args.depth, args.dec_dim).train()
    opt = module.configure_optimizers()["optimizer"]
    dm = datamodule(root, args, **(args.cfg if fed else {"augment": args.cfg["augment"]}))
    loader = dm.train_dataloader()
    if fed and args.cfg["cache_images"] and args.cfg["persistent_workers"]:
        for _ in loader:  # a persistent worker keeps its image cache across epochs: time a warm one
            pass
    if not fed:
        pre = list(itertools.islice(loader, args.train_steps + 1))
        it = iter(pre)
    else:
        it = iter(loader)
    n = 0
    batch = next(it)
    for i in range(args.train_steps + 1):
        if i == 1:
            t0 = time.perf_counter()  # the first step (and worker start-up) is excluded
        loss = plain_loss(module, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 1:
            n += batch["image"].shape[0]
        if i < args.train_steps:
            batch = next(it)
    return n / (time.perf_counter() - t0)


FED = "training fed by the loader (unified.yaml's data settings)"


def main(argv: list[str] | None = None) -> int:
    p = cpu_parser(__doc__, batch=32, quick="4 batches, 6 steps, 1 repeat (~1.5 min on 2 cores)")
    p.add_argument("--root", default="data/bench_synth")
    p.add_argument("--train_samples", type=int, default=256, help="generated train samples (first use)")
    p.add_argument(
        "--val_samples", type=int, default=64, help="as benchmarks.unified_vs_separate: one shared dataset"
    )
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--train_steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    args = parse_cpu_args(
        p,
        argv,
        quick={"batches": 4, "train_steps": 6, "repeats": 1},
        smoke={
            "batch": 2,
            "batches": 2,
            "train_steps": 1,
            "repeats": 1,
            "train_samples": 8,
            "val_samples": 4,
        },
    )
    torch.set_num_threads(args.threads)
    args.cfg = config_data()
    if args.smoke:
        args.cfg["num_workers"] = min(args.cfg["num_workers"], 1)
    root = ensure_dataset(
        Path(args.root), args.train_samples, args.val_samples, (args.img_size[0], args.img_size[1])
    )

    rows = [(w, c) for c in (False, True) for w in (0, 1, 2)]
    if args.smoke:
        rows = [(0, False), (1, False)]
    rates: dict[str, list[float]] = {}
    for r in range(args.repeats):
        order = rows if r % 2 == 0 else rows[::-1]
        for w, c in order:
            rates.setdefault(f"loader, {w} workers, cache_images={c}", []).append(
                loader_rate(root, args, w, c)
            )
        rates.setdefault("model consumes (pre-collated batches)", []).append(train_rate(root, args, False))
        rates.setdefault(FED, []).append(train_rate(root, args, True))
    med = {k: statistics.median(v) for k, v in rates.items()}
    cfg = args.cfg
    print(f"\nthreads={args.threads} batch={args.batch} img={tuple(args.img_size)} depth={args.depth}")
    print(f"{args.batches} loader batches, {args.train_steps} train steps, x{args.repeats}")
    print(f"unified.yaml data settings: {cfg}\n")
    print("| what | samples/s (median) |")
    print("|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} |")
    model = med["model consumes (pre-collated batches)"]
    fed = med[FED]
    key = f"loader, {cfg['num_workers']} workers, cache_images={cfg['cache_images']}"
    loader = med.get(key)
    if loader is not None:
        print(
            f"\nthe config's loader ({cfg['num_workers']} workers) / model consumption: {loader / model:.2f}x"
        )
    print(f"training fed by the loader / on pre-collated batches: {fed / model:.2f}x")
    ok = (loader is None or loader >= model) and fed / model >= 0.9
    print(
        f"verdict: the data pipeline is {'NOT the bottleneck' if ok else 'the BOTTLENECK'} of the default CPU config"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
