"""Document templates: the six fictitious document types, their layouts and their static layers.

A template is drawn once per (doc type, resolution) and cached per process: background gradient and pattern,
guilloche rosettes, header band, field captions, plus the class map of ``card_mask`` (1 document, 2 portrait,
3 MRZ) and the alpha of the document outline (rounded corners for ID-1 cards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from idrecog.synth import fonts

ID1_MM = (85.60, 53.98)
TD3_MM = (125.0, 88.0)
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Style:
    """What makes a document type look like itself."""

    doc_type: str
    issuer: str  # 3-letter code of the fictitious issuing country
    size_mm: tuple[float, float]
    title: str
    subtitle: str
    bg: tuple[tuple[int, int, int], tuple[int, int, int]]  # gradient top-left -> bottom-right
    pattern: str  # waves | stripes | dots | grid | rings | weave
    ink: tuple[int, int, int]  # guilloche colour
    band: tuple[int, int, int]  # header band colour
    text: tuple[int, int, int]
    caption: tuple[int, int, int]
    face: str  # value font
    caption_face: str
    portrait_side: str  # left | right
    mrz: str | None  # td1 | td3 | None
    hologram: str | None  # circle | square | None, where it sits is in the layout
    states_nationality: bool
    numbered_captions: bool = False


STYLES: dict[str, Style] = {
    s.doc_type: s
    for s in [
        Style(
            "ald_id_card",
            "ALD",
            ID1_MM,
            "REPUBLIC OF ALDORIA",
            "IDENTITY CARD",
            ((196, 226, 236), (150, 196, 214)),
            "waves",
            (40, 110, 150),
            (22, 60, 110),
            (15, 20, 40),
            (40, 80, 120),
            fonts.SANS_BOLD,
            fonts.SANS,
            "left",
            "td1",
            "circle",
            True,
        ),
        Style(
            "ald_passport",
            "ALD",
            TD3_MM,
            "REPUBLIC OF ALDORIA",
            "PASSPORT",
            ((226, 214, 236), (196, 178, 214)),
            "rings",
            (120, 70, 150),
            (70, 40, 100),
            (20, 15, 30),
            (90, 60, 120),
            fonts.SANS,
            fonts.SANS,
            "left",
            "td3",
            "square",
            True,
        ),
        Style(
            "brv_id_card",
            "BRV",
            ID1_MM,
            "BORVANIA",
            "NATIONAL IDENTITY CARD",
            ((248, 226, 180), (236, 190, 120)),
            "stripes",
            (190, 110, 30),
            (150, 60, 20),
            (40, 20, 10),
            (130, 70, 30),
            fonts.SERIF_BOLD,
            fonts.SERIF,
            "right",
            None,
            None,
            True,
        ),
        Style(
            "brv_driving_licence",
            "BRV",
            ID1_MM,
            "BORVANIA",
            "DRIVING LICENCE",
            ((246, 210, 220), (230, 170, 190)),
            "dots",
            (200, 90, 130),
            (60, 90, 170),
            (30, 20, 40),
            (150, 60, 100),
            fonts.CONDENSED_BOLD,
            fonts.CONDENSED,
            "left",
            None,
            None,
            False,
            True,
        ),
        Style(
            "cst_passport",
            "CST",
            TD3_MM,
            "CESTRIAN REPUBLIC",
            "PASSPORT",
            ((214, 236, 206), (170, 210, 170)),
            "weave",
            (50, 130, 70),
            (20, 90, 50),
            (10, 30, 15),
            (40, 100, 60),
            fonts.SERIF,
            fonts.SANS,
            "left",
            "td3",
            None,
            True,
        ),
        Style(
            "cst_residence_permit",
            "CST",
            ID1_MM,
            "CESTRIA",
            "RESIDENCE PERMIT",
            ((226, 226, 232), (186, 190, 206)),
            "grid",
            (90, 90, 140),
            (90, 40, 60),
            (25, 25, 35),
            (80, 80, 110),
            fonts.CONDENSED,
            fonts.SANS,
            "right",
            "td1",
            "square",
            True,
        ),
    ]
}

#: text fields in reading order; number/name/birth_date are also detection classes
FIELD_CAPTIONS = {
    "name": "SURNAME, GIVEN NAMES",
    "number": "DOCUMENT No.",
    "birth_date": "DATE OF BIRTH",
    "nationality": "NATIONALITY",
    "expiry": "DATE OF EXPIRY",
}


@dataclass
class Template:
    style: Style
    size: tuple[int, int]  # (W, H) document pixels
    image: Image.Image  # RGB static layer
    alpha: Image.Image  # L, 255 inside the document outline
    classes: Image.Image  # L, card_mask classes in document pixels
    portrait: Box
    ghost: Box
    values: dict[str, tuple[float, float]]  # field -> value anchor (left, top)
    value_size: int
    mrz: Box | None
    mrz_size: int
    hologram: Box | None
    boxes: dict[str, Box] = field(default_factory=dict)


def doc_size(doc_type: str, doc_width: int) -> tuple[int, int]:
    w_mm, h_mm = STYLES[doc_type].size_mm
    return doc_width, round(doc_width * h_mm / w_mm)


def _background(style: Style, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (x / w + y / h)[..., None] / 2
    c0, c1 = np.array(style.bg[0], np.float32), np.array(style.bg[1], np.float32)
    img = c0 * (1 - t) + c1 * t
    s = w / 480
    if style.pattern == "waves":
        p = np.sin(y / (6 * s) + 2.5 * np.sin(x / (40 * s)))
    elif style.pattern == "stripes":
        p = np.sin((x + y) / (4 * s))
    elif style.pattern == "dots":
        p = np.sin(x / (5 * s)) * np.sin(y / (5 * s))
    elif style.pattern == "grid":
        p = np.maximum(np.cos(x / (3 * s)), np.cos(y / (3 * s)))
    elif style.pattern == "rings":
        p = np.sin(np.hypot(x - w * 0.7, y - h * 0.45) / (4 * s))
    else:  # weave
        p = np.sin(x / (7 * s) + np.sin(y / (9 * s)) * 3) * np.cos(y / (7 * s))
    ink = np.array(style.ink, np.float32)
    a = (0.10 * (p[..., None] > 0.6)).astype(np.float32)
    img = img * (1 - a) + ink * a
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _rosette(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, k: int, colour, width: int) -> None:
    """Guilloche-like sine rosette: r(t) = r (0.7 + 0.3 sin(k t)), several phase-shifted copies."""
    t = np.linspace(0, 2 * np.pi, 720)
    for ph in np.linspace(0, np.pi / k, 6, endpoint=False):
        rr = r * (0.7 + 0.3 * np.sin(k * t + ph)) * (1 + 0.05 * np.sin(3 * t))
        pts = np.stack([cx + rr * np.cos(t + ph), cy + rr * np.sin(t + ph)], 1)
        d.line([tuple(p) for p in pts], fill=colour, width=width)


@lru_cache(maxsize=32)
def get_template(doc_type: str, doc_width: int) -> Template:
    style = STYLES[doc_type]
    w, h = doc_size(doc_type, doc_width)
    rng = np.random.default_rng(sum(map(ord, doc_type)))  # fixed per type: the template is static
    img = Image.fromarray(_background(style, w, h, rng))
    d = ImageDraw.Draw(img, "RGBA")
    s = w / 480
    lw = max(1, round(s))
    ink_a = (*style.ink, 110)
    # guilloche rosettes and a sine border
    _rosette(d, w * (0.72 if style.portrait_side == "left" else 0.3), h * 0.5, h * 0.38, 11, ink_a, lw)
    _rosette(d, w * 0.5, h * 0.55, h * 0.22, 7, (*style.ink, 70), lw)
    xs = np.linspace(0, w, 300)
    for off in (0.035, 0.965):
        d.line([(x, h * off + 3 * s * np.sin(x / (6 * s))) for x in xs], fill=ink_a, width=lw)
    # header band and titles
    band_h = h * (0.15 if style.mrz != "td3" else 0.13)
    d.rectangle([0, h * 0.04, w, band_h + h * 0.04], fill=(*style.band, 230))
    tf = fonts.get_font(fonts.SANS_BOLD, round(band_h * 0.48))
    d.text((w * 0.03, h * 0.04 + band_h * 0.5), style.title, font=tf, fill=(250, 250, 250), anchor="lm")
    sf = fonts.get_font(fonts.SANS, round(band_h * 0.36))
    d.text((w * 0.97, h * 0.04 + band_h * 0.5), style.subtitle, font=sf, fill=(240, 240, 240), anchor="rm")
    d.text((w * 0.97, h * 0.04 + band_h * 1.35), style.issuer, font=sf, fill=style.caption, anchor="rm")

    top = h * 0.04 + band_h + h * 0.05
    bottom = {"td1": 0.64, "td3": 0.70, None: 0.94}[style.mrz] * h
    ph = bottom - top
    pw = ph * 0.78
    px = w * 0.04 if style.portrait_side == "left" else w * 0.96 - pw
    portrait = (px, top, px + pw, bottom)
    col_x = px + pw + w * 0.04 if style.portrait_side == "left" else w * 0.05
    names = [n for n in FIELD_CAPTIONS if n != "nationality" or style.states_nationality]
    row = (bottom - top) / len(names)
    cap_size = max(6, round(row * 0.30))
    value_size = max(8, round(row * 0.52))
    cf = fonts.get_font(style.caption_face, cap_size)
    values = {}
    for i, n in enumerate(names):
        y = top + i * row
        cap = f"{i + 1}. {FIELD_CAPTIONS[n]}" if style.numbered_captions else FIELD_CAPTIONS[n]
        d.text((col_x, y), cap, font=cf, fill=style.caption)
        values[n] = (col_x, y + cap_size * 1.15)
    ghost_w = pw * 0.36
    gx = w * 0.94 - ghost_w if style.portrait_side == "left" else w * 0.06 + pw * 0.0 + w * 0.42
    ghost = (gx, bottom - ghost_w * 1.28, gx + ghost_w, bottom)

    mrz = None
    mrz_size = 0
    if style.mrz is not None:
        n_lines, n_chars = (3, 30) if style.mrz == "td1" else (2, 44)
        mrz = (w * 0.03, bottom + h * 0.03, w * 0.97, h * 0.955)
        mrz_w, mrz_h = mrz[2] - mrz[0], mrz[3] - mrz[1]
        # DejaVu Sans Mono advances 0.602 em per character
        mrz_size = int(min(mrz_w / (n_chars * 0.602), mrz_h / (n_lines * 1.18)))
        d.rectangle(mrz, fill=(250, 250, 245, 150))
    hologram = None
    if style.hologram is not None:
        hs = ph * 0.34
        hx, hy = portrait[2] - hs * 0.55, portrait[3] - hs * 0.9
        if style.portrait_side == "right":
            hx = portrait[0] - hs * 0.45
        if doc_type == "ald_passport":
            hx, hy = w * 0.80, top
        hologram = (hx, hy, hx + hs, hy + hs)

    alpha = Image.new("L", (w, h), 0)
    radius = round(w * 3.18 / 85.6) if style.size_mm == ID1_MM else 0
    ImageDraw.Draw(alpha).rounded_rectangle([0, 0, w - 1, h - 1], radius=radius, fill=255)
    classes = Image.new("L", (w, h), 0)
    cd = ImageDraw.Draw(classes)
    cd.rounded_rectangle([0, 0, w - 1, h - 1], radius=radius, fill=1)
    cd.rectangle([round(v) for v in portrait], fill=2)
    if mrz is not None:
        cd.rectangle([round(v) for v in mrz], fill=3)
    return Template(
        style,
        (w, h),
        img.convert("RGB"),
        alpha,
        classes,
        portrait,
        ghost,
        values,
        value_size,
        mrz,
        mrz_size,
        hologram,
    )
