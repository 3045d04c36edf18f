"""Where image_quality is lost: four checks on the synthetic benchmark, validation MAE for each.

1. ``features``: ridge regression (and a 64-unit MLP) on 14 hand-made image statistics - is the label in the image?
2. ``probe``: ridge on mean- and mean+std-pooled encoder tokens, of a random encoder and (``--ckpt``) of a trained
   unified model; with ``--ckpt`` also that model's own head - does the encoder carry it, does the model read it?
3. ``readout``: a frozen random encoder, the task decoder and the regression head trained on image_quality alone -
   can the decoder and head read it?
4. ``e2e``: the same with the encoder trained too, once per ``--encoder-lr-scales`` - what does training the
   encoder at a given rate do to it?

Model and optimiser as ``lightning_configs/unified.yaml`` (ViT-Tiny depth 4, decoder 128 x 2, AdamW lr 2e-3,
weight decay 0.05, 50 warm-up steps then cosine, batch 32). Results: docs/results.md, "Encoder learning rate".

    python -m benchmarks.image_quality_probe --data data/synthetic --ckpt runs/unified/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from idrecog.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from idrecog.models.decoder import TaskDecoder
from idrecog.models.encoder import ViTEncoder
from idrecog.tasks.regression import RegressionHead

LR, WD, WARMUP, BATCH = 2e-3, 0.05, 50, 32


def load_split(root: Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (uint8 images [N, 3, H, W], image_quality [N]) of the samples that carry the label."""
    rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if (r.get("labels") or {}).get("image_quality") is not None][:limit]
    if not rows:
        raise SystemExit(f"{root / f'{split}.jsonl'}: no sample carries an image_quality label")
    imgs = [np.asarray(Image.open(root / r["image"]).convert("RGB")) for r in rows]
    shapes = {a.shape for a in imgs}
    if len(shapes) > 1:
        raise SystemExit(
            f"{root}/{split}: images of several sizes {sorted(shapes)}; this check needs one size"
        )
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([float(r["labels"]["image_quality"]) for r in rows])


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def hand_features(img: np.ndarray) -> list[float]:
    """14 statistics of one [H, W, 3] uint8 image: exposure, sharpness, noise and JPEG blockiness."""
    g = img.astype(np.float32).mean(2)
    lap = ndimage.laplace(g)
    grad = np.hypot(ndimage.sobel(g, 1), ndimage.sobel(g, 0))
    high = g - ndimage.gaussian_filter(g, 1.0)
    med = g - ndimage.median_filter(g, 3)
    d = np.abs(np.diff(g, axis=1))
    blocky = d[:, 7::8].mean() / (d.mean() + 1e-6)  # 8 x 8 block edges against all column steps
    return [
        g.mean(),
        g.std(),
        np.percentile(g, 99),
        (g > 250).mean(),
        np.percentile(g, 50),
        lap.std(),
        np.log1p(lap.var()),
        grad.mean(),
        np.percentile(grad, 95),
        high.std(),
        np.abs(med).mean(),
        np.median(np.abs(med)),
        blocky,
        img.reshape(-1, 3).std(0).mean(),
    ]


def ridge_mae(a: np.ndarray, y: np.ndarray, b: np.ndarray, yv: np.ndarray) -> float:
    """Standardise on the train rows, fit ridge for a few penalties, return the best validation MAE."""
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    best = math.inf
    for lam in (1.0, 10.0, 100.0, 1000.0):
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y - y.mean()))
        best = min(best, float(np.abs(b @ w + y.mean() - yv).mean()))
    return best


def mlp_mae(a: np.ndarray, y: np.ndarray, b: np.ndarray, yv: np.ndarray, steps: int) -> float:
    mu, sd = a.mean(0), a.std(0) + 1e-6
    at, bt = (
        torch.tensor((a - mu) / sd, dtype=torch.float32),
        torch.tensor((b - mu) / sd, dtype=torch.float32),
    )
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(a.shape[1], 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    yt = torch.tensor(y, dtype=torch.float32)
    for _ in range(steps):
        loss = F.l1_loss(m(at).squeeze(-1), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((m(bt).squeeze(-1) - torch.tensor(yv)).abs().mean())


def make_encoder(img: tuple[int, int], depth: int, width: int | None) -> ViTEncoder:
    kw = {} if width is None else {"embed_dim": width, "num_heads": 2}
    return ViTEncoder("vit_tiny_patch16_224", img_size=img, depth=depth, **kw)


@torch.no_grad()
def tokens(enc: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    enc.eval()
    return torch.cat([enc(normalise(c)) for c in x.split(64)])


def pooled(t: torch.Tensor, with_std: bool) -> np.ndarray:
    parts = [t.mean(1)] + ([t.std(1)] if with_std else [])
    return torch.cat(parts, 1).numpy()


def train_readout(
    enc: ViTEncoder,
    xt: torch.Tensor,
    yt: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    steps: int,
    encoder_lr_scale: float | None,
    dim: int,
    frozen_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """Decoder + regression head (+ the encoder when ``encoder_lr_scale`` is set) on image_quality alone.
    ``frozen_tokens``: the frozen encoder's (train, val) tokens when they are already computed."""
    torch.manual_seed(0)
    dec = TaskDecoder(dim=dim, depth=2, num_heads=4)
    dec.build(int(enc.embed_dim), tuple(enc.grid_size))
    head = RegressionHead(dim)
    query = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    groups = [{"params": [*dec.parameters(), *head.parameters(), query], "lr": LR}]
    frozen = encoder_lr_scale is None
    if frozen and frozen_tokens is None:
        frozen_tokens = tokens(enc, xt), tokens(enc, xv)
    cached_t = frozen_tokens[0] if frozen and frozen_tokens is not None else None
    if not frozen:
        groups.append({"params": list(enc.parameters()), "lr": LR * float(encoder_lr_scale)})
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD)
    base = [g["lr"] for g in opt.param_groups]
    g = torch.Generator().manual_seed(0)

    def predict(x: torch.Tensor | None, t: torch.Tensor | None) -> torch.Tensor:
        mem = t if t is not None else enc(normalise(x))
        return head(dec(query.expand(mem.shape[0], -1, -1), mem, [slice(0, 1)]))["value"]

    enc.train(not frozen)
    for s in range(steps):
        f = min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * s / steps))
        for pg, b in zip(opt.param_groups, base, strict=True):
            pg["lr"] = b * f
        idx = torch.randint(0, len(yt), (BATCH,), generator=g)
        pred = predict(None, cached_t[idx]) if cached_t is not None else predict(xt[idx], None)
        loss = F.smooth_l1_loss(pred, yt[idx], beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tv = frozen_tokens[1] if frozen and frozen_tokens is not None else tokens(enc, xv)
    with torch.no_grad():
        return float((predict(None, tv) - yv).abs().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/synthetic", help="a dataset folder with image_quality labels")
    p.add_argument("--ckpt", default=None, help="a unified-model checkpoint to probe (check 2)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps of checks 3 and 4")
    p.add_argument("--encoder-lr-scales", type=float, nargs="*", default=[1.0, 0.1])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--smoke", action="store_true", help="tiny encoder, 3 steps (tests)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data)
    t0 = time.perf_counter()
    xt, yt = load_split(root, "train")
    xv, yv = load_split(root, "val")
    img = (int(xt.shape[-2]), int(xt.shape[-1]))
    depth, width, dim = (1, 32, 32) if args.smoke else (4, None, 128)
    steps = 3 if args.smoke else args.steps
    rows: list[tuple[str, float]] = [("mean predictor (train mean)", float((yv - yt.mean()).abs().mean()))]

    ft = np.array([hand_features(a) for a in xt.permute(0, 2, 3, 1).numpy()])
    fv = np.array([hand_features(a) for a in xv.permute(0, 2, 3, 1).numpy()])
    rows.append(("1. ridge on 14 hand-made image statistics", ridge_mae(ft, yt.numpy(), fv, yv.numpy())))
    rows.append(
        ("1. MLP (64 units) on the same", mlp_mae(ft, yt.numpy(), fv, yv.numpy(), 3 if args.smoke else 2000))
    )

    torch.manual_seed(0)
    rand = make_encoder(img, depth, width)
    encoders = [("random encoder", rand)]
    model = None
    if args.ckpt:
        from idrecog.lit.unified import load_unified

        model = load_unified(args.ckpt).eval().model
        encoders.append((f"trained encoder ({args.ckpt})", model.encoder))
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the random encoder's are reused in check 3
    for name, enc in encoders:
        tt, tv = encoded[name] = tokens(enc, xt), tokens(enc, xv)
        for std in (False, True):
            what = "mean- and std-pooled" if std else "mean-pooled"
            rows.append(
                (
                    f"2. ridge on {what} tokens, {name}",
                    ridge_mae(pooled(tt, std), yt.numpy(), pooled(tv, std), yv.numpy()),
                )
            )
    if model is not None:
        with torch.no_grad():
            out = torch.cat(
                [
                    model(normalise(c), ["image_quality"])["outputs"]["image_quality"]["value"]
                    for c in xv.split(64)
                ]
            )
        rows.append(("2. the checkpoint's own head", float((out - yv).abs().mean())))

    rows.append(
        (
            f"3. frozen random encoder + decoder + head, {steps} steps",
            train_readout(rand, xt, yt, xv, yv, steps, None, dim, encoded["random encoder"]),
        )
    )
    for scale in args.encoder_lr_scales:
        torch.manual_seed(0)
        enc = make_encoder(img, depth, width)
        mae = train_readout(enc, xt, yt, xv, yv, steps, scale, dim)
        rows.append((f"4. encoder trained too (from random), encoder lr x{scale:g}, {steps} steps", mae))

    print(
        f"image_quality checks on {root} (train {len(yt)}, val {len(yv)} labelled samples, {img[0]} x {img[1]})"
    )
    print("\n| check | val MAE |\n|---|---:|")
    for name, v in rows:
        print(f"| {name} | {v:.4f} |")
    print(f"\n[image_quality_probe] total wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
