"""What task types draw their labels and outputs on: one :class:`Canvas` per image, two renderings.

A task type's ``draw_target`` / ``draw_output`` (see :class:`idrecog.tasks.base.TaskType`) records primitives
(class masks, boxes, caption lines) on the canvas; :meth:`Canvas.render` draws them into a picture
(``idrecog data show``, ``idrecog predict`` overlays) and :meth:`Canvas.wandb_image` hands them to W&B as its own
toggleable mask and box layers. So a new task type is drawn everywhere by writing its two methods once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "Canvas", "font"]

# tab10-like colours: mask classes (index 0 is left transparent) and box classes
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
IGNORE = 255


@lru_cache(maxsize=8)
def font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` px: matplotlib's bundled copy, so every system draws the same glyphs."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


@dataclass
class _Mask:
    name: str
    mask: np.ndarray  # [H, W] class indices, 255 = ignore
    classes: list[str]


@dataclass
class _Boxes:
    name: str
    boxes: list[
        tuple[list[float], int, str, float | None]
    ]  # (xyxy in image pixels, class index, text, score)
    classes: list[str]


@dataclass
class Canvas:
    """Primitives drawn over one RGB image (``image``: the picture the labels' coordinates refer to).

    ``layer`` names what is drawn (``"target"``, ``"prediction"``); it prefixes the W&B layer names.
    """

    image: Image.Image
    layer: str = ""
    masks: list[_Mask] = field(default_factory=list)
    boxes: list[_Boxes] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ what task types call
    def mask(self, name: str, mask: Any, classes: Sequence[str]) -> None:
        """A class-index mask [H, W] (0 = background, left clear; 255 = ignore) of the image's size or not."""
        self.masks.append(_Mask(name, np.asarray(mask).astype(np.int64), list(classes)))

    def box_list(
        self,
        name: str,
        boxes: Sequence[tuple[Sequence[float], int, float | None]],
        classes: Sequence[str],
    ) -> None:
        """Boxes ``(x0, y0, x1, y1)`` in image pixels, each with its class index and an optional score."""
        names = list(classes)
        items = []
        for xyxy, label, score in boxes:
            text = names[label] if 0 <= label < len(names) else str(label)
            if score is not None:
                text += f" {score:.2f}"
            items.append(([float(v) for v in xyxy], int(label), text, score))
        self.boxes.append(_Boxes(name, items, names))

    def text(self, line: str) -> None:
        """A caption line (a class, a value, a state such as "(no frames)")."""
        self.lines.append(line)

    # ------------------------------------------------------------------ renderings
    def render(self, width: int | None = None, alpha: float = 0.45, caption: bool = True) -> Image.Image:
        """The image with masks blended in, boxes and their labels drawn, scaled to ``width`` (None: as is), and
        the caption lines below it (``caption``)."""
        base = np.asarray(self.image.convert("RGB")).astype(np.float32)
        h, w = base.shape[:2]
        for m in self.masks:
            mask = m.mask
            if mask.shape != (h, w):
                mask = np.asarray(
                    Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)
                )
            colours = np.zeros((256, 3), dtype=np.float32)
            for c in range(1, IGNORE):
                colours[c] = PALETTE[(c - 1) % len(PALETTE)]
            a = ((mask > 0) & (mask != IGNORE)).astype(np.float32)[..., None] * alpha
            base = base * (1 - a) + colours[np.clip(mask, 0, 255)] * a
        img = Image.fromarray(base.round().clip(0, 255).astype(np.uint8))
        scale = 1.0
        if width is not None and width != w:
            scale = width / w
            img = img.resize((width, max(1, round(h * scale))), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(img)
        f = font(11)
        for group in self.boxes:
            for xyxy, label, text, _ in group.boxes:
                colour = PALETTE[label % len(PALETTE)]
                x0, y0, x1, y1 = (v * scale for v in xyxy)
                draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
                tb = draw.textbbox((x0 + 1, y0 + 1), text, font=f)
                draw.rectangle(tb, fill=(0, 0, 0))
                draw.text((x0 + 1, y0 + 1), text, fill=colour, font=f)
        if not caption or not self.lines:
            return img
        line_h = f.size + 3 if hasattr(f, "size") else 13
        out = Image.new("RGB", (img.width, img.height + line_h * len(self.lines) + 4), (255, 255, 255))
        out.paste(img, (0, 0))
        d = ImageDraw.Draw(out)
        for k, line in enumerate(self.lines):
            d.text((2, img.height + 2 + k * line_h), line, fill=(0, 0, 0), font=f)
        return out

    def wandb_image(self, extra: Canvas | None = None, caption: Sequence[str] = ()) -> Any:
        """A ``wandb.Image`` of the image with the masks and boxes as W&B layers (``{layer}/{task}``), those of
        ``extra`` (say, the ground truth beside the prediction) as further layers, and the caption lines."""
        import wandb

        masks: dict[str, Any] = {}
        boxes: dict[str, Any] = {}
        lines = list(caption)
        for canvas in (self, extra):
            if canvas is None:
                continue
            prefix = f"{canvas.layer}/" if canvas.layer else ""
            for m in canvas.masks:
                data = m.mask.copy()
                data[data == IGNORE] = 0
                masks[f"{m.name}/{canvas.layer or 'mask'}"] = {
                    "mask_data": data,
                    "class_labels": dict(enumerate(m.classes)),
                }
            for g in canvas.boxes:
                boxes[f"{g.name}/{canvas.layer or 'boxes'}"] = {
                    "box_data": [
                        {
                            "position": {"minX": b[0][0], "minY": b[0][1], "maxX": b[0][2], "maxY": b[0][3]},
                            "domain": "pixel",
                            "class_id": b[1],
                            "box_caption": b[2],
                            **({"scores": {"score": float(b[3])}} if b[3] is not None else {}),
                        }
                        for b in g.boxes
                    ],
                    "class_labels": dict(enumerate(g.classes)),
                }
            lines += [f"{prefix}{line}" for line in canvas.lines]
        return wandb.Image(
            np.asarray(self.image.convert("RGB")),
            masks=masks or None,
            boxes=boxes or None,
            caption="\n".join(lines),
        )
