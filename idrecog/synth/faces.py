"""Procedural portraits of fictitious people: ellipse head, hair, eyes, mouth, shoulders, plain backdrop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

_SKIN = np.array(
    [[255, 224, 196], [241, 194, 155], [224, 172, 125], [198, 134, 90], [141, 85, 54], [92, 56, 38]]
)
_HAIR = np.array(
    [
        [20, 16, 14],
        [60, 40, 25],
        [110, 72, 40],
        [180, 140, 80],
        [210, 190, 140],
        [140, 140, 140],
        [150, 60, 30],
    ]
)
_BACKDROP = np.array([[225, 230, 235], [205, 215, 228], [232, 226, 210], [210, 225, 215], [240, 240, 240]])


@dataclass(frozen=True)
class Face:
    """Appearance parameters of one person (drawn at any size)."""

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    backdrop: tuple[int, int, int]
    clothes: tuple[int, int, int]
    head_w: float  # fraction of the portrait width
    head_h: float  # fraction of the portrait height
    head_y: float  # centre, fraction of height
    hair_style: int  # 0 short, 1 long, 2 bald-ish, 3 fringe
    eye_dy: float
    mouth_w: float


def _jitter(rng: np.random.Generator, palette: np.ndarray, amount: float) -> tuple[int, int, int]:
    c = palette[rng.integers(len(palette))] + rng.normal(0, amount, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def sample_face(rng: np.random.Generator) -> Face:
    return Face(
        skin=_jitter(rng, _SKIN, 8),
        hair=_jitter(rng, _HAIR, 10),
        backdrop=_jitter(rng, _BACKDROP, 6),
        clothes=tuple(int(v) for v in rng.integers(20, 200, 3)),  # type: ignore[arg-type]
        head_w=float(rng.uniform(0.42, 0.58)),
        head_h=float(rng.uniform(0.46, 0.58)),
        head_y=float(rng.uniform(0.40, 0.48)),
        hair_style=int(rng.integers(4)),
        eye_dy=float(rng.uniform(-0.04, 0.03)),
        mouth_w=float(rng.uniform(0.10, 0.2)),
    )


def draw_face(face: Face, size: tuple[int, int]) -> Image.Image:
    """An RGB portrait of ``size`` (W, H)."""
    w, h = size
    img = Image.new("RGB", size, face.backdrop)
    d = ImageDraw.Draw(img)
    cx, cy = w / 2, h * face.head_y
    hw, hh = w * face.head_w / 2, h * face.head_h / 2
    # shoulders and neck
    d.ellipse([cx - w * 0.48, h * 0.80, cx + w * 0.48, h * 1.35], fill=face.clothes)
    d.rectangle([cx - hw * 0.38, cy + hh * 0.6, cx + hw * 0.38, h * 0.86], fill=face.skin)
    # hair behind the head
    if face.hair_style == 1:
        d.rounded_rectangle(
            [cx - hw * 1.2, cy - hh * 1.15, cx + hw * 1.2, cy + hh * 1.1], radius=hw, fill=face.hair
        )
    elif face.hair_style != 2:
        d.ellipse([cx - hw * 1.1, cy - hh * 1.18, cx + hw * 1.1, cy + hh * 0.4], fill=face.hair)
    d.ellipse([cx - hw, cy - hh, cx + hw, cy + hh], fill=face.skin)
    if face.hair_style == 3:
        d.chord([cx - hw * 1.02, cy - hh * 1.1, cx + hw * 1.02, cy + hh * 0.1], 180, 360, fill=face.hair)
    elif face.hair_style == 0:
        d.chord([cx - hw * 1.05, cy - hh * 1.12, cx + hw * 1.05, cy - hh * 0.2], 180, 360, fill=face.hair)
    # eyes, brows, nose, mouth
    ey = cy - hh * 0.1 + h * face.eye_dy
    for sx in (-1, 1):
        ex = cx + sx * hw * 0.42
        d.ellipse([ex - hw * 0.16, ey - hh * 0.07, ex + hw * 0.16, ey + hh * 0.07], fill=(245, 245, 245))
        d.ellipse([ex - hw * 0.08, ey - hh * 0.07, ex + hw * 0.08, ey + hh * 0.07], fill=(40, 30, 25))
        d.line(
            [ex - hw * 0.2, ey - hh * 0.2, ex + hw * 0.2, ey - hh * 0.22],
            fill=face.hair,
            width=max(1, w // 40),
        )
    shade = tuple(int(c * 0.8) for c in face.skin)
    d.line(
        [cx, ey + hh * 0.05, cx - hw * 0.08, ey + hh * 0.35, cx + hw * 0.04, ey + hh * 0.38],
        fill=shade,
        width=max(1, w // 60),
    )
    my = cy + hh * 0.55
    mw = w * face.mouth_w / 2
    d.arc(
        [cx - mw, my - hh * 0.12, cx + mw, my + hh * 0.08], 20, 160, fill=(150, 60, 60), width=max(1, w // 40)
    )
    return img
