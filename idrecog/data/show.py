"""``idrecog data show DIR --out grid.png``: a grid of samples with their labels drawn on them.

Each tile: the image with segmentation masks overlaid semi-transparently, detection boxes with their class
names, the frames of multi-frame samples (flash, angles) as a column of thumbnails beside it, and a caption
with the id, doc type and classification/regression labels.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from idrecog.data.dataset import IdDataset
from idrecog.errors import ConfigError

FONT_PATH = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
# tab10-like colours: mask classes (index 0 is left transparent) and box classes
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(str(FONT_PATH), size)
    except OSError:
        return ImageFont.load_default()


def _to_pil(img: torch.Tensor) -> Image.Image:
    """img: [3, H, W] float in [0, 1] -> RGB PIL image."""
    arr = (img.as_subclass(torch.Tensor).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def _overlay(base: Image.Image, mask: torch.Tensor, alpha: float = 0.45) -> Image.Image:
    """Blend class colours over ``base`` where mask is a class > 0 (255 = ignore stays clear)."""
    m = mask.as_subclass(torch.Tensor).numpy()
    colours = np.zeros((256, 3), dtype=np.uint8)
    for c in range(1, 255):
        colours[c] = PALETTE[(c - 1) % len(PALETTE)]
    rgb = colours[m]
    a = ((m > 0) & (m != 255)).astype(np.float32)[..., None] * alpha
    out = np.asarray(base).astype(np.float32) * (1 - a) + rgb.astype(np.float32) * a
    return Image.fromarray(out.round().astype(np.uint8))


def _caption(ds: IdDataset, index: int, item: dict[str, Any]) -> list[str]:
    s = ds.samples[index]
    lines = [f"{s.id}  [{s.doc_type or 'no doc_type'}]"]
    parts = []
    for j, spec in enumerate(ds.catalogue):
        if spec.type not in ("classification", "regression") or not bool(item["applies"][j]):
            continue
        value = s.labels.get(spec.name)
        if bool(item["present"][j]):
            parts.append(f"{spec.name}={value:.3g}" if isinstance(value, float) else f"{spec.name}={value}")
        elif bool(item["frames_missing"][j]):
            parts.append(f"{spec.name}=(no frames)")
        elif value is not None:
            parts.append(f"{spec.name}=(masked)")
    # wrap the labels two per line to keep tiles narrow
    lines += ["  ".join(parts[k : k + 2]) for k in range(0, len(parts), 2)]
    return lines


def _tile(ds: IdDataset, index: int, width: int, font: Any) -> Image.Image:
    item = ds[index]
    img = _to_pil(item["image"])
    for spec in ds.catalogue:
        t = item["targets"].get(spec.name)
        if isinstance(t, torch.Tensor) and t.ndim == 2:
            img = _overlay(img, t)
    scale = width / img.width
    img = img.resize((width, max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for spec in ds.catalogue:
        t = item["targets"].get(spec.name)
        if isinstance(t, dict) and "boxes" in t:
            classes = list(spec.classes or [])
            for box, label in zip(
                t["boxes"].as_subclass(torch.Tensor).tolist(), t["labels"].tolist(), strict=True
            ):
                colour = PALETTE[label % len(PALETTE)]
                x0, y0, x1, y1 = (v * scale for v in box)
                draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
                text = classes[label] if label < len(classes) else str(label)
                tb = draw.textbbox((x0 + 1, y0 + 1), text, font=font)
                draw.rectangle(tb, fill=(0, 0, 0))
                draw.text((x0 + 1, y0 + 1), text, fill=colour, font=font)
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
    lines = _caption(ds, index, item)
    line_h = font.size + 3 if hasattr(font, "size") else 13
    h = max(img.height, len(frames) * (thumb_h + 2)) + line_h * len(lines) + 4
    tile = Image.new("RGB", (width + (thumb_w + 4 if frames else 0), h), (255, 255, 255))
    tile.paste(img, (0, 0))
    d = ImageDraw.Draw(tile)
    for k, (name, f) in enumerate(frames):
        y = k * (thumb_h + 2)
        tile.paste(f.resize((thumb_w, thumb_h), Image.Resampling.BILINEAR), (width + 4, y))
        d.text((width + 6, y + 1), name, fill=(255, 255, 0), font=font)
    y = max(img.height, len(frames) * (thumb_h + 2)) + 2
    for line in lines:
        d.text((2, y), line, fill=(0, 0, 0), font=font)
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
    font = _font(11)
    tiles = [_tile(ds, i, tile_width, font) for i in picks]
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
