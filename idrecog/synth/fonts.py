"""Fonts: DejaVu TrueType faces when installed, else Pillow's built-in scalable default font."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

#: faces the templates use (DejaVu file stems)
SANS, SANS_BOLD, SERIF, SERIF_BOLD, MONO, CONDENSED, CONDENSED_BOLD = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSansMono",
    "DejaVuSansCondensed",
    "DejaVuSansCondensed-Bold",
)
FACES = (SANS, SANS_BOLD, SERIF, SERIF_BOLD, MONO, CONDENSED, CONDENSED_BOLD)


@lru_cache(maxsize=512)
def get_font(face: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A cached font of ``face`` at ``size`` pixels (cached per process: font loading dominates small renders)."""
    size = max(int(size), 4)
    path = FONT_DIR / f"{face}.ttf"
    if path.is_file():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)
