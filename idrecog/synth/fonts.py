"""Fonts: the system's DejaVu TrueType faces, else the DejaVu faces bundled with matplotlib (a dependency), so
every installation renders documents with real, scalable fonts.

The system folder comes first so that a machine with DejaVu installed (Debian/Ubuntu ``fonts-dejavu-core``)
renders the same bytes as before; matplotlib's copy is another DejaVu release, so documents rendered from it
differ in glyph pixels. The first fallback logs a warning naming the folder used (:func:`font_source`).
matplotlib ships no condensed faces: there the regular Sans faces stand in for them.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

log = logging.getLogger(__name__)

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
# stand-ins for faces a font folder may lack (matplotlib bundles no condensed DejaVu)
_SUBSTITUTES = {CONDENSED: SANS, CONDENSED_BOLD: SANS_BOLD}


def _bundled_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=1)
def font_source() -> Path | None:
    """The folder the faces are read from: :data:`FONT_DIR` when it has DejaVu Sans, else matplotlib's
    bundled fonts; None when neither has it (Pillow's built-in font is used)."""
    if (FONT_DIR / f"{SANS}.ttf").is_file():
        return FONT_DIR
    bundled = _bundled_dir()
    if (bundled / f"{SANS}.ttf").is_file():
        log.warning(
            "DejaVu fonts not found in %s: rendering with matplotlib's bundled DejaVu (%s); synthetic images "
            "differ in glyph pixels from a machine with the system fonts (Debian/Ubuntu: fonts-dejavu-core)",
            FONT_DIR,
            bundled,
        )
        return bundled
    return None


def font_path(face: str) -> Path | None:
    """The TrueType file of ``face`` in :func:`font_source` (or its stand-in), None when there is none."""
    src = font_source()
    if src is None:
        return None
    for name in (face, _SUBSTITUTES.get(face)):
        if name and (src / f"{name}.ttf").is_file():
            return src / f"{name}.ttf"
    return None


@lru_cache(maxsize=512)
def get_font(face: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A cached font of ``face`` at ``size`` pixels (cached per process: font loading dominates small renders)."""
    size = max(int(size), 4)
    path = font_path(face)
    if path is not None:
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)
