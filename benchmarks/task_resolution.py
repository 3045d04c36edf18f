"""Task resolution when training samples lack a doc type: the task classifier against oracle doc types and
against dropping those samples (issue 6).

    .venv/bin/python benchmarks/task_resolution.py [--quick] [--train 2000] [--val 300] [--drop 0.3]
        [--steps 600] [--classifier-epochs 4] [--accelerator cpu] [--root data/task_resolution]

1. Generates the synthetic benchmark once (``ROOT/oracle``, every sample with its doc type) and derives
   ``ROOT/dropped``: the same images, with ``doc_type`` removed from ``--drop`` of the training lines (seeded).
   Validation lines keep their doc type, so ``val/score`` is measured on the same tasks in every run.
2. Trains the task classifier on ``ROOT/dropped`` (samples without doc type are left out of its loss) and
   reports its validation exact-match ratio, and its exact match on the training samples whose doc type was
   removed (against the true doc type's task set).
3. Trains the unified model (``lightning_configs/unified.yaml``, same seed, same number of optimiser steps
   ``--steps``) three times: (a) ``ROOT/dropped`` with ``task_resolver: classifier``; (b) ``ROOT/oracle`` with
   the doc-type resolver; (c) ``ROOT/dropped`` with ``doc_type`` resolver ``missing: skip`` (samples without
   doc type ignored). Each ends with one validation pass; ``val/score`` of each is printed.

``--quick`` is the small CPU budget (600 train / 150 val, 100 steps, 2 classifier epochs at 96 x 160): about ten
minutes on 2 idle cores; its figures only show the pipeline works. Results are printed and written as JSON to
``ROOT/results.json``; copy them to docs/task-resolution.md with command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("WANDB_MODE", "offline")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def make_datasets(
    root: Path, train: int, val: int, seed: int, drop: float, workers: int
) -> tuple[Path, Path]:
    """ROOT/oracle (generated once) and ROOT/dropped (its train lines without doc_type for a ``drop`` fraction)."""
    from idrecog.synth.generate import generate_dataset

    oracle, dropped = root / "oracle", root / f"dropped_{drop:g}"

    def lines(split: str) -> int:
        f = oracle / f"{split}.jsonl"
        return len(f.read_text().splitlines()) if f.is_file() else -1

    if lines("train") != train or lines("val") != val:  # missing, or another size
        generate_dataset(oracle, train=train, val=val, test=0, seed=seed, workers=workers, overwrite=True)
    if dropped.exists():
        shutil.rmtree(dropped)
    dropped.mkdir(parents=True)
    for sub in ("images", "masks", "frames"):
        (dropped / sub).symlink_to((oracle / sub).resolve(), target_is_directory=True)
    for name in ("tasks.yaml", "val.jsonl", "test.jsonl"):
        shutil.copy(oracle / name, dropped / name)
    rng = random.Random(seed)
    lines = []
    for raw in (oracle / "train.jsonl").read_text().splitlines():
        obj = json.loads(raw)
        if rng.random() < drop:
            obj.pop(
                "doc_type", None
            )  # the doc_type label stays: the data is the same, only the field is gone
        lines.append(json.dumps(obj, separators=(",", ":")))
    (dropped / "train.jsonl").write_text("\n".join(lines) + "\n")
    return oracle, dropped


def trainer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    gpu = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
    return {
        "accelerator": "gpu" if gpu else "cpu",
        "devices": 1,
        "precision": "bf16-mixed" if gpu else "32-true",
    }


def train_classifier(args: argparse.Namespace, dropped: Path, out: Path) -> tuple[Path, dict[str, float]]:
    import lightning as L

    from idrecog.data.datamodule import IdDataModule
    from idrecog.lit.task_classifier import TaskClassifierModule

    L.seed_everything(args.seed, verbose=False)
    dm = IdDataModule(
        root=str(dropped),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        augment=True,
        seed=args.seed,
    )
    module = TaskClassifierModule(
        catalogue=dm.catalogue.to_dict(),
        backbone=args.classifier_backbone,
        input_size=tuple(args.classifier_input_size),
    )
    trainer = L.Trainer(
        **trainer_kwargs(args),
        max_epochs=args.classifier_epochs,
        check_val_every_n_epoch=10**6,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    trainer.fit(module, datamodule=dm)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    ckpt = out / "task_classifier.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, {k: float(v) for k, v in metrics.items()}


def classifier_on_dropped(
    args: argparse.Namespace, oracle: Path, dropped: Path, ckpt: Path
) -> dict[str, Any]:
    """Exact match of the classifier's task sets on the train samples whose doc type was removed."""
    from idrecog.data.catalogue import load_catalogue
    from idrecog.data.classifier_resolver import ClassifierResolver
    from idrecog.data.manifest import read_manifest
    from idrecog.data.resolvers import DocTypeResolver

    cat = load_catalogue(dropped / "tasks.yaml")
    samples = read_manifest(dropped / "train.jsonl", cat)
    oracle_samples = read_manifest(oracle / "train.jsonl", cat)
    truth = dict(
        zip(
            [s.id for s in oracle_samples], DocTypeResolver(cat).resolve(oracle_samples, "train"), strict=True
        )
    )
    r = ClassifierResolver(cat, ckpt, threshold=args.threshold, cache_dir=args.root / "cache")
    got = r.resolve(samples, "train")
    missing = [(s.id, g) for s, g in zip(samples, got, strict=True) if s.doc_type is None]
    exact = sum(g == truth[i] for i, g in missing)
    return {"samples_without_doc_type": len(missing), "exact_match": exact / max(1, len(missing))}


def train_unified(args: argparse.Namespace, name: str, root: Path, extra: list[str]) -> dict[str, float]:
    from idrecog.lit.cli import build_cli

    override = args.root / "runs" / name / "override.yaml"
    override.parent.mkdir(parents=True, exist_ok=True)
    tk = trainer_kwargs(args)
    override.write_text(
        json.dumps(
            {
                "trainer": {
                    **tk,
                    "max_steps": args.steps,
                    "max_epochs": -1,
                    "check_val_every_n_epoch": 10**6,
                    "callbacks": [],
                    "logger": False,
                    "enable_checkpointing": False,
                    "enable_model_summary": False,
                    "default_root_dir": str(override.parent),
                },
                "data": {"root": str(root), "synthesize_if_missing": False, "num_workers": args.num_workers},
            }
        )
    )
    argv = ["--config", str(REPO / "lightning_configs" / "unified.yaml"), "--config", str(override), *extra]
    cli = build_cli(argv, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {k: float(v) for k, v in metrics.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=REPO / "data" / "task_resolution")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--drop", type=float, default=0.3, help="fraction of train samples without doc_type")
    p.add_argument(
        "--steps", type=int, default=600, help="optimiser steps of each unified training (the budget)"
    )
    p.add_argument("--classifier-epochs", type=int, default=4)
    p.add_argument("--classifier-backbone", default="resnet18")
    p.add_argument("--classifier-input-size", type=int, nargs=2, default=[96, 160])
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--synth-workers", type=int, default=2)
    p.add_argument("--accelerator", default="cpu", help="cpu | gpu | auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="a,b,c", help="which unified runs: a (classifier), b (oracle), c (skip)")
    p.add_argument(
        "--quick", action="store_true", help="the ~10 min CPU budget: 600/150 samples, 100 steps, 2 epochs"
    )
    args = p.parse_args()
    if args.quick:
        args.train, args.val, args.steps, args.classifier_epochs = 600, 150, 100, 2
    if args.accelerator == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    args.root.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    oracle, dropped = make_datasets(args.root, args.train, args.val, args.seed, args.drop, args.synth_workers)
    times["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ckpt, cls_metrics = train_classifier(args, dropped, args.root / "runs" / "classifier")
    on_dropped = classifier_on_dropped(args, oracle, dropped, ckpt)
    times["classifier"] = time.perf_counter() - t0
    print(
        f"[bench] classifier: val exact match {cls_metrics.get('val/exact_match', float('nan')):.4f}; "
        f"train samples without doc_type: exact match {on_dropped['exact_match']:.4f} "
        f"({on_dropped['samples_without_doc_type']} samples)",
        flush=True,
    )

    resolver_args = {
        "task_classifier_ckpt": str(ckpt),
        "threshold": args.threshold,
        "cache_dir": str(args.root / "cache"),
    }
    runs = {
        "a": (
            "classifier resolver",
            dropped,
            ["--data.task_resolver=classifier", f"--data.resolver_args={json.dumps(resolver_args)}"],
        ),
        "b": ("oracle doc types", oracle, []),
        "c": (
            "skip samples without doc_type",
            dropped,
            ["--data.task_resolver=doc_type", '--data.resolver_args={"missing": "skip"}'],
        ),
    }
    results: dict[str, Any] = {}
    for key in args.runs.split(","):
        label, root, extra = runs[key]
        t0 = time.perf_counter()
        m = train_unified(args, key, root, extra)
        times[f"unified_{key}"] = time.perf_counter() - t0
        results[key] = {"label": label, "val/score": m.get("val/score"), "metrics": m}
        print(
            f"[bench] ({key}) {label}: val/score {m.get('val/score', float('nan')):.4f} "
            f"in {times[f'unified_{key}']:.0f}s",
            flush=True,
        )

    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "classifier": {"val": cls_metrics, "train_without_doc_type": on_dropped},
        "unified": results,
        "seconds": times,
    }
    (args.root / "results.json").write_text(json.dumps(summary, indent=2))
    print("\n| run | val/score |\n|---|---|")
    for key, r in results.items():
        print(f"| ({key}) {r['label']} | {r['val/score']:.4f} |")
    print(
        f"\nclassifier exact match: val {cls_metrics.get('val/exact_match', float('nan')):.4f}, "
        f"train samples without doc_type {on_dropped['exact_match']:.4f}"
    )
    print(
        f"seconds: {json.dumps({k: round(v) for k, v in times.items()})}; results: {args.root / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
