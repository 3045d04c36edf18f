"""``idrecog data show DIR --out grid.png``: a grid of samples with their labels drawn on them.

Each tile: the image with every applying task's label drawn by its task type (``TaskType.draw_target``: masks
overlaid, boxes with their class names, class names and values in the caption), the frames of multi-frame
samples (flash, angles) as a column of thumbnails beside it, and a caption with the id and doc type.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from idrecog.data.dataset import IdDataset
from idrecog.errors import ConfigError
from idrecog.tasks.drawing import Canvas, font


def _to_pil(img: torch.Tensor) -> Image.Image:
    """img: [3, H, W] float in [0, 1] -> RGB PIL image."""
    arr = (img.as_subclass(torch.Tensor).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def _tile(ds: IdDataset, index: int, width: int) -> Image.Image:
    """The sample's image with every applying task's label drawn by its task type, the frames of the capture
    as thumbnails beside it, and a caption: id, doc type, then the labels' lines (masked ones say why)."""
    item = ds[index]
    s = ds.samples[index]
    canvas = Canvas(_to_pil(item["image"]), layer="target")
    canvas.text(f"{s.id}  [{s.doc_type or 'no doc_type'}]")
    for j, tt in enumerate(ds.task_types):
        if not bool(item["applies"][j]):
            continue
        name = tt.spec.name
        if bool(item["present"][j]):
            tt.draw_target(canvas, item["targets"][name])
        elif bool(item["frames_missing"][j]):
            canvas.text(f"{name}=(no frames)")
        elif s.labels.get(name) is not None:
            canvas.text(f"{name}=(masked)")
    img = canvas.render(width=width, caption=False)
    f = font(11)
    frames: list[tuple[str, Image.Image]] = []
    assoc = item.get("assoc")
    if assoc:
        if assoc.get("flash") is not None:
            frames.append(("flash", _to_pil(assoc["flash"])))
        frames += [
            (f"angle {k}", _to_pil(a)) for k, a in enumerate(assoc.get("angles") or []) if a is not None
        ]
    thumb_w = width // 3 if frames else 0
    thumb_h = round(thumb_w * img.height / img.width) if frames else 0
    # the id line, then the labels two per line to keep tiles narrow
    head, labels = canvas.lines[:1], canvas.lines[1:]
    lines = head + ["  ".join(labels[k : k + 2]) for k in range(0, len(labels), 2)]
    line_h = f.size + 3 if hasattr(f, "size") else 13
    h = max(img.height, len(frames) * (thumb_h + 2)) + line_h * len(lines) + 4
    tile = Image.new("RGB", (width + (thumb_w + 4 if frames else 0), h), (255, 255, 255))
    tile.paste(img, (0, 0))
    d = ImageDraw.Draw(tile)
    for k, (name, fr) in enumerate(frames):
        y = k * (thumb_h + 2)
        tile.paste(fr.resize((thumb_w, thumb_h), Image.Resampling.BILINEAR), (width + 4, y))
        d.text((width + 6, y + 1), name, fill=(255, 255, 0), font=f)
    y = max(img.height, len(frames) * (thumb_h + 2)) + 2
    for line in lines:
        d.text((2, y), line, fill=(0, 0, 0), font=f)
        y += line_h
    return tile


def show_samples(
    root: str | Path,
    *,
    split: str = "train",
    n: int = 16,
    seed: int = 0,
    out: str | Path = "grid.png",
    tile_width: int = 320,
    allow_external_paths: bool = False,
) -> Path:
    """Draw ``n`` random samples of ``split`` (seeded) into a grid PNG at ``out``; returns the path."""
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    ds = IdDataset(root, split, allow_external_paths=allow_external_paths, drop_empty=False)
    if len(ds) == 0:
        raise ConfigError(f"{Path(root) / (split + '.jsonl')} has no samples to show")
    picks = random.Random(seed).sample(range(len(ds)), min(n, len(ds)))
    tiles = [_tile(ds, i, tile_width) for i in picks]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    cw, ch = max(t.width for t in tiles), max(t.height for t in tiles)
    pad = 6
    grid = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + pad) + pad), (230, 230, 230))
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        grid.paste(t, (pad + c * (cw + pad), pad + r * (ch + pad)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
