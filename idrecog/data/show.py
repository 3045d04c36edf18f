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
from PIL import Image, ImageDraw, ImageFont

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


# ------------------------------------------------------------------------------------------------ cues
def _display(crop: Image.Image, height: int) -> Image.Image:
    """A crop scaled to ``height`` pixels with nearest-neighbour sampling, so pixels stay visible as pixels."""
    scale = height / max(1, crop.height)
    return crop.resize((max(1, round(crop.width * scale)), height), Image.Resampling.NEAREST)


def _as_model_sees(image: Image.Image, img_size: tuple[int, int]) -> Image.Image:
    """The image through the model's resize (antialiased, as the eval transform does), back at its own size."""
    h, w = img_size
    return image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None).resize(
        image.size, Image.Resampling.NEAREST
    )


def _row(
    cells: list[tuple[str, Image.Image]], f: ImageFont.ImageFont | ImageFont.FreeTypeFont
) -> Image.Image:
    """Images side by side, each under its caption (a cell is as wide as the wider of the two)."""
    line_h = (f.size + 4) if hasattr(f, "size") else 14
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(c.width, round(probe.textlength(t, font=f))) for t, c in cells]
    row = Image.new(
        "RGB", (sum(widths) + 10 * (len(cells) + 1), max(c.height for _, c in cells) + line_h + 8), "white"
    )
    d = ImageDraw.Draw(row)
    x = 10
    for (caption, c), w in zip(cells, widths, strict=True):
        row.paste(c, (x, line_h + 4))
        d.text((x, 2), caption, fill=(0, 0, 0), font=f)
        x += w + 10
    return row


def show_cues(
    root: str | Path,
    *,
    task: str = "tampering",
    frames_task: str | None = "hologram",
    split: str = "val",
    per_class: int = 2,
    img_size: tuple[int, int] = (160, 256),
    height: int = 120,
    out: str | Path = "cues.png",
    allow_external_paths: bool = False,
) -> Path:
    """What an anti-fraud cue looks like: for each class of ``task`` (bona fide first), ``per_class`` samples,
    each as the crop around its evidence box (manifest ``evidence``; the whole image without one) at the stored
    resolution and as the model sees it at ``img_size``; then, for ``frames_task``, the main image and every
    frame of two captures (one per class) at both resolutions. Crops are shown ``height`` pixels high."""
    from idrecog.data.dataset import read_rgb
    from idrecog.data.manifest import read_manifest
    from idrecog.tasks.catalogue import load_catalogue

    root = Path(root)
    cat = load_catalogue(root / "tasks.yaml")
    if task not in cat or not cat[task].classes:
        raise ConfigError(f"--task {task!r} is not a classification task of {root / 'tasks.yaml'}")
    samples = read_manifest(root / f"{split}.jsonl", cat, allow_external_paths=allow_external_paths)
    f = font(12)
    rows: list[Image.Image] = []
    for cls in cat[task].classes or ():
        picked = [s for s in samples if s.labels.get(task) == cls]
        picked = sorted(picked, key=lambda s: task not in s.evidence)[:per_class]  # those with evidence first
        for s in picked:
            image = Image.fromarray(read_rgb(root / s.image).permute(1, 2, 0).numpy())
            box = s.evidence.get(task)
            pad = 0.25
            if box is not None:
                bw, bh = box[2] - box[0], box[3] - box[1]
                region = (box[0] - pad * bw, box[1] - pad * bh, box[2] + pad * bw, box[3] + pad * bh)
            else:
                region = (0, 0, image.width, image.height)
            region = tuple(round(v) for v in region)
            seen = _as_model_sees(image, img_size)
            sx, sy = img_size[1] / image.width, img_size[0] / image.height
            cw, ch = region[2] - region[0], region[3] - region[1]
            rows.append(
                _row(
                    [
                        (f"{task}={cls}  {s.id}  {cw}x{ch} px stored", _display(image.crop(region), height)),
                        (
                            f"as the model sees it: {round(cw * sx)}x{round(ch * sy)} px at {img_size[1]}x{img_size[0]}",
                            _display(seen.crop(region), height),
                        ),
                    ],
                    f,
                )
            )
    if frames_task is not None and frames_task in cat and cat[frames_task].uses_frames:
        for cls in cat[frames_task].classes or ():
            s = next((s for s in samples if s.labels.get(frames_task) == cls and s.flash and s.angles), None)
            if s is None:
                continue
            named = [("main", s.image), ("flash", s.flash)] + [
                (f"angle {k + 1}", a) for k, a in enumerate(s.angles)
            ]
            cells = []
            for name, rel in named:
                im = Image.fromarray(read_rgb(root / rel).permute(1, 2, 0).numpy())
                cells.append((f"{frames_task}={cls} {name}", _display(im, height)))
            rows.append(_row(cells, f))
            cells = []
            for name, rel in named:
                im = Image.fromarray(read_rgb(root / rel).permute(1, 2, 0).numpy())
                cells.append(
                    (f"{name} at {img_size[1]}x{img_size[0]}", _display(_as_model_sees(im, img_size), height))
                )
            rows.append(_row(cells, f))
    if not rows:
        raise ConfigError(f"{root / (split + '.jsonl')} has no labelled sample of task {task!r}")
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (235, 235, 235))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
