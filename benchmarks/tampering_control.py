"""Positive control for the tampering task: can a model learn it from the benchmark's images at all, and which?

This trains single-task tampering
classifiers on the same training split, for the same wall-clock budget each, with class-balanced cross-entropy
(inverse class frequency, so no model can score by predicting the majority), and reports the validation macro F1
(torchmetrics, as the unified model's ``val/tampering/f1``):

* ``cnn``: timm ``mobilenetv3_small_100``, a small full-resolution CNN (its first convolutions see single pixels);
* ``vit``: the default job's encoder (timm ``vit_tiny_patch16_224``, 4 blocks, 16-pixel patches, a linear patch
  embedding), mean-pooled tokens, a linear head;
* ``hybrid``: the same ViT behind a convolutional stem (timm ``vit_tiny_r_s16_p8_224`` with 4-pixel patches on
  its ResNet stem: the same 10 x 16 token grid at stride 16).

    python -m benchmarks.tampering_control --models cnn vit hybrid --seconds 480 --threads 2
    python -m benchmarks.tampering_control --root BIGGER_SET --models cnn --seconds 960 --min-quality 0.6
    python -m benchmarks.tampering_control --root data/synthetic_hires --img-size 320 512 --models cnn --device cuda

Prints one line per validation and a table at the end; ``--out FILE`` writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassF1Score

from idrecog.data.datamodule import IdDataModule

TASK = "tampering"


def create_control(name: str, img_size: tuple[int, int], num_classes: int) -> nn.Module:
    """The control models by name (see the module docstring)."""
    if name == "cnn":
        return timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=num_classes)
    vit_args: dict[str, Any] = dict(
        pretrained=False, img_size=img_size, depth=4, num_classes=num_classes, global_pool="avg"
    )
    if name == "vit":
        return timm.create_model("vit_tiny_patch16_224", **vit_args)
    if name == "hybrid":
        return timm.create_model("vit_tiny_r_s16_p8_224", patch_size=4, **vit_args)
    raise ValueError(f"unknown control model {name!r}; choose from cnn, vit, hybrid")


def _tampering_batch(
    batch: dict[str, Any], t: int, min_quality: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and tampering targets of the labelled samples (and, with ``min_quality``, clean captures)."""
    keep = batch["present"][:, t]
    if min_quality is not None:
        # normalised by the catalogue range, which is [0, 1]: the label itself; NaN where unlabelled (dropped)
        keep = keep & (batch["targets"]["image_quality"] >= min_quality)
    return batch["image"][keep], batch["targets"][TASK][keep]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, t: int, num_classes: int, min_quality: float | None = None, device: str = "cpu"
) -> dict[str, Any]:
    model.eval()
    f1 = MulticlassF1Score(num_classes, average="macro")
    per_class = MulticlassF1Score(num_classes, average="none")
    for batch in loader:
        x, y = _tampering_batch(batch, t, min_quality)
        if len(y):
            pred = model(x.to(device)).argmax(-1).cpu()
            f1.update(pred, y)
            per_class.update(pred, y)
    model.train()
    return {"f1": float(f1.compute()), "per_class": [round(float(v), 3) for v in per_class.compute()]}


def run_control(
    name: str,
    loaders: tuple[DataLoader, DataLoader],
    spec: Any,
    t: int,
    img_size: tuple[int, int],
    seconds: float,
    lr: float,
    evals: int,
    seed: int,
    min_quality: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train control ``name`` on tampering for ``seconds`` of training (validations not counted); ``loaders``:
    (train, val), built once so their persistent workers keep the decoded images across epochs and models."""
    train_loader, val_loader = loaders
    torch.manual_seed(seed)
    model = create_control(name, img_size, spec.num_classes).to(device)
    # inverse class frequency over the labelled training samples: predicting the majority scores nothing
    counts = torch.zeros(spec.num_classes)
    for batch in train_loader:
        _, y = _tampering_batch(batch, t, min_quality)
        counts += torch.bincount(y, minlength=spec.num_classes)
    if not counts.sum():
        # the budget loop below trains at least one step: without a labelled sample it never could
        raise SystemExit(
            f"{name}: no labelled tampering sample in the training split (min quality {min_quality})"
        )
    weight = (counts.sum() / (spec.num_classes * counts.clamp(min=1))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    train_f1 = MulticlassF1Score(spec.num_classes, average="macro")
    history: list[dict[str, Any]] = []
    steps, images, paused = 0, 0, 0.0

    def trained() -> float:
        return time.perf_counter() - start - paused

    def log() -> None:
        nonlocal paused
        t0 = time.perf_counter()
        val = evaluate(model, val_loader, t, spec.num_classes, min_quality, device)
        paused += time.perf_counter() - t0  # validation is not training time
        row = {
            "steps": steps,
            "images": images,
            "train_seconds": round(trained(), 1),
            "train_f1": round(float(train_f1.compute()), 3) if train_f1.update_count else None,
            "val_f1": round(val["f1"], 3),
            "val_f1_per_class": val["per_class"],
        }
        print(f"[{name}] {json.dumps(row)}", flush=True)
        history.append(row)
        train_f1.reset()

    next_eval = seconds / evals
    start = time.perf_counter()  # the budget is training time: the class counts above are not in it
    while trained() < seconds:
        for batch in train_loader:
            elapsed = trained()
            if elapsed >= seconds and steps:  # at least one step, however short the budget
                break
            # warm-up then cosine over the wall-clock budget
            frac = elapsed / seconds
            scale = min(1.0, frac / 0.05) * 0.5 * (1 + math.cos(math.pi * frac))
            for g in opt.param_groups:
                g["lr"] = lr * scale
            x, y = _tampering_batch(batch, t, min_quality)
            if not len(y):
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_f1.update(logits.detach().argmax(-1).cpu(), y.cpu())
            steps += 1
            images += len(y)
            if trained() >= next_eval:
                next_eval += seconds / evals
                log()
    if not history or history[-1]["steps"] != steps:
        log()
    best = max(history, key=lambda h: h["val_f1"])
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "params_m": params / 1e6, "history": history, "best": best, "final": history[-1]}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/synthetic")
    ap.add_argument("--models", nargs="+", default=["cnn", "vit", "hybrid"])
    ap.add_argument("--seconds", type=float, default=480, help="training wall-clock budget per model")
    ap.add_argument("--evals", type=int, default=4, help="validations per model (best and final reported)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--min-quality",
        type=float,
        default=None,
        help="keep only samples whose image_quality label is at least this (train and val): is the cue learnable "
        "where the capture does not hide it?",
    )
    ap.add_argument("--limit-train", type=int, default=None, help="use this many training samples (tests)")
    ap.add_argument("--img-size", type=int, nargs=2, default=[160, 256], help="H W the models read")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dm = IdDataModule(
        root=args.root,
        img_size=tuple(args.img_size),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
        cache_images=True,
        augment=False,
        limit_train_samples=args.limit_train,
        seed=args.seed,
        load_frames=False,
    )
    dm.setup("fit")
    loaders = (dm.train_dataloader(), dm.val_dataloader())
    spec, t = dm.catalogue[TASK], dm.catalogue.names.index(TASK)
    results = [
        run_control(
            m,
            loaders,
            spec,
            t,
            dm.img_size,
            args.seconds,
            args.lr,
            args.evals,
            args.seed,
            args.min_quality,
            args.device,
        )
        for m in args.models
    ]
    print("\n| model | params (M) | steps | images seen | best val macro F1 | final val macro F1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        f = r["final"]
        print(
            f"| {r['model']} | {r['params_m']:.2f} | {f['steps']} | {f['images']} | {r['best']['val_f1']:.3f}"
            f" | {f['val_f1']:.3f} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
