"""Fonts of the synthetic documents: the system's DejaVu when installed, else matplotlib's bundled DejaVu (never
Pillow's bitmap default), and rendering stays deterministic either way."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pytest
from PIL import ImageFont

from idrecog.synth import fonts
from idrecog.synth.generate import generate_dataset

BUNDLED = Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _clear() -> None:
    fonts.font_source.cache_clear()
    fonts.get_font.cache_clear()


@pytest.fixture
def no_system_fonts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The system font folder points at an empty one (fonts are cached per process: cleared around the test)."""
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    monkeypatch.setattr(fonts, "FONT_DIR", empty)
    _clear()
    yield empty
    _clear()  # the next user computes them again from the real folder (monkeypatch restores FONT_DIR)


def _images(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "images").rglob("*")) if p.is_file()
    }


def test_every_face_comes_from_matplotlib_without_system_fonts(
    no_system_fonts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=fonts.__name__):
        assert fonts.font_source() == BUNDLED
    assert str(no_system_fonts) in caplog.text and "matplotlib" in caplog.text  # said once, not silently
    for face in fonts.FACES:
        font = fonts.get_font(face, 20)
        assert isinstance(font, ImageFont.FreeTypeFont), face
        assert Path(font.path).parent == BUNDLED, face
    assert Path(fonts.get_font(fonts.CONDENSED, 20).path).name == "DejaVuSans.ttf"  # the stand-in


def test_rendering_without_system_fonts_is_deterministic(no_system_fonts: Path, tmp_path: Path) -> None:
    kw = dict(train=2, val=0, test=0, seed=5, workers=1, progress=False)
    a = _images(generate_dataset(tmp_path / "a", **kw))
    b = _images(generate_dataset(tmp_path / "b", **kw))
    assert a and a == b
