"""One document instance: a fictitious holder, its printed fields, MRZ, portrait, hologram and forgery."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from idrecog.synth import fonts, mrz
from idrecog.synth.faces import Face, draw_face, sample_face
from idrecog.synth.templates import Box, Template, get_template

_SYL = [
    "al",
    "bor",
    "ces",
    "dan",
    "el",
    "fen",
    "gar",
    "hal",
    "ir",
    "jov",
    "kel",
    "lin",
    "mar",
    "nor",
    "os",
    "pel",
    "quin",
    "ras",
    "sol",
    "tam",
    "ul",
    "vek",
    "wen",
    "yar",
    "zo",
    "ri",
    "na",
    "ta",
    "ve",
    "lo",
]
TAMPERING = ("genuine", "portrait_swap", "text_edit")
TAMPER_P = (0.6, 0.2, 0.2)
_EDIT_FACES = (fonts.SERIF, fonts.SERIF_BOLD, fonts.SANS, fonts.CONDENSED, fonts.SANS_BOLD, fonts.MONO)


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(_SYL[i] for i in rng.integers(len(_SYL), size=n)).capitalize()


@dataclass
class Person:
    surname: str
    given: str
    sex: str
    birth: tuple[int, int, int]  # (year, month, day)
    face: Face


def sample_person(rng: np.random.Generator) -> Person:
    return Person(
        surname=_word(rng, int(rng.integers(2, 4))),
        given=_word(rng, int(rng.integers(2, 3))),
        sex="F" if rng.random() < 0.5 else "M",
        birth=(int(rng.integers(1940, 2006)), int(rng.integers(1, 13)), int(rng.integers(1, 29))),
        face=sample_face(rng),
    )


@dataclass
class Document:
    """A rendered document in document pixels, before it is photographed."""

    doc_type: str
    template: Template
    image: Image.Image  # RGB, hologram not yet applied
    boxes: dict[str, Box]  # detection fields in document pixels
    tampering: str
    hologram: dict[str, Any] | None  # {box, hue, sat, val} of the printed hologram patch
    info: dict[str, Any] = field(default_factory=dict)


def _ymd(y: int, m: int, d: int) -> str:
    return f"{y % 100:02d}{m:02d}{d:02d}"


def _paste_portrait(img: Image.Image, face: Face, box: Box, *, soft: bool) -> None:
    x0, y0, x1, y1 = (round(v) for v in box)
    por = draw_face(face, (x1 - x0, y1 - y0))
    if soft:  # genuine prints fade into the background at the edge
        m = Image.new("L", por.size, 0)
        ImageDraw.Draw(m).rectangle([2, 2, por.width - 3, por.height - 3], fill=255)
        img.paste(por, (x0, y0), m.filter(ImageFilter.BoxBlur(2)))
    else:
        img.paste(por, (x0, y0))


def _swap_portrait(
    rng: np.random.Generator, img: Image.Image, t: Template, doc_width: int, info: dict[str, Any]
) -> None:
    """A portrait substitution as fraud makes it: another person's photo, printed on another printer (its own
    colour grading), cut and pasted a little off the window with a hard edge and a re-print halo around it. The
    ghost image keeps the holder's face, so it no longer matches. The cue sizes scale with the document."""
    x0, y0, x1, y1 = t.portrait
    pw = x1 - x0
    shift = rng.uniform(-0.05, 0.05, 2) * pw
    sbox = (x0 + shift[0], y0 + shift[1], x1 + shift[0], y1 + shift[1])
    other = sample_face(rng)
    photo = draw_face(other, (round(sbox[2] - sbox[0]), round(sbox[3] - sbox[1])))
    # another print process: a colour cast, a contrast and a gamma of its own
    cast = rng.uniform(-28, 28, 3)
    contrast = rng.uniform(1.15, 1.45) if rng.random() < 0.5 else rng.uniform(0.65, 0.85)
    arr = np.asarray(photo, np.float32)
    arr = (arr - 128) * contrast + 128 + cast
    photo = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    # the re-print halo: a band of paper around the pasted photo (light) or of glue shadow (dark)
    halo = max(2, round(pw * rng.uniform(0.05, 0.09)))
    tone = (245, 245, 238) if rng.random() < 0.5 else (70, 64, 58)
    hx0, hy0, hx1, hy1 = (round(v) for v in sbox)
    ImageDraw.Draw(img).rectangle([hx0 - halo, hy0 - halo, hx1 + halo, hy1 + halo], fill=tone)
    img.paste(photo, (hx0, hy0))
    info["halo_px"] = halo
    info["cue_box"] = (hx0 - halo, hy0 - halo, hx1 + halo, hy1 + halo)


def _edit_text(
    rng: np.random.Generator,
    img: Image.Image,
    t: Template,
    old: Box,
    at: tuple[float, float],
    new_val: str,
    info: dict[str, Any],
) -> Box:
    """A text edit as fraud makes it: the printed value erased with a flat patch (the security background under
    it is gone), the new value set in another face, size, weight, ink and baseline, and the patch locally
    resampled and recompressed (an edited region carries another resolution and JPEG history than the print)."""
    st = t.style
    x, y0 = at
    pad = max(2, round(t.value_size * 0.35))
    ex0, ey0 = round(old[0]) - pad, round(old[1]) - pad
    # the patch may run past the old value (a longer one was printed), never off the card
    ex1 = min(round(old[0] + (old[2] - old[0]) * rng.uniform(1.05, 1.35)) + pad, round(t.size[0] * 0.97))
    ey1 = round(old[3]) + pad
    bg = np.asarray(img.crop((ex0, ey0, ex1, ey1)), np.float32).reshape(-1, 3)
    flat = np.median(bg, 0) + rng.choice([-1, 1]) * rng.uniform(14, 30) + rng.normal(0, 6, 3)
    d = ImageDraw.Draw(img)
    d.rectangle([ex0, ey0, ex1, ey1], fill=tuple(int(v) for v in np.clip(flat, 0, 255)))
    face = str(rng.choice([f for f in _EDIT_FACES if f != st.face]))
    size = round(t.value_size * rng.choice([rng.uniform(0.75, 0.88), rng.uniform(1.12, 1.3)]))
    dy = float(rng.choice([-1, 1]) * rng.uniform(0.15, 0.35) * t.value_size)
    ink = np.array(st.text, np.float32) + rng.choice([-1, 1]) * rng.uniform(45, 90, 3)
    ef = fonts.get_font(face, size)
    d.text((x, y0 + dy), new_val, font=ef, fill=tuple(int(v) for v in np.clip(ink, 0, 255)))
    nb = d.textbbox((x, y0 + dy), new_val, font=ef)
    # local resampling and recompression of the edited region only
    region = img.crop((ex0, ey0, ex1, ey1))
    f = float(rng.uniform(2.0, 3.0))
    small = region.resize(
        (max(1, round(region.width / f)), max(1, round(region.height / f))), Image.Resampling.BILINEAR
    )
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=int(rng.integers(20, 45)))
    with Image.open(buf) as im:
        img.paste(im.convert("RGB").resize(region.size, Image.Resampling.BILINEAR), (ex0, ey0))
    info["cue_box"] = (ex0, ey0, ex1, ey1)
    return (
        min(nb[0], old[0], ex0),
        min(nb[1], old[1], ey0),
        max(nb[2], old[2], ex1),
        max(nb[3], old[3], ey1),
    )


def render_document(rng: np.random.Generator, doc_type: str, doc_width: int, foil: bool = True) -> Document:
    """Draw a document of ``doc_type`` at ``doc_width`` pixels; forgery and hologram appearance drawn from ``rng``.
    ``foil=False``: an issue of the type printed without its hologram foil (older series)."""
    t = get_template(doc_type, doc_width)
    st = t.style
    img = t.image.copy()
    # per-print colour variation: a slight tint of the whole card
    tint = rng.normal(1.0, 0.03, 3)
    lut = np.clip(np.arange(256)[None, :] * tint[:, None], 0, 255).astype(np.uint8).reshape(-1)
    img = img.point(lut.tolist())
    d = ImageDraw.Draw(img)
    person = sample_person(rng)
    y, m, day = person.birth
    number = (
        st.issuer[0]
        + "".join(str(v) for v in rng.integers(0, 10, 2))
        + "".join(chr(65 + v) for v in rng.integers(0, 26, 2))
        + "".join(str(v) for v in rng.integers(0, 10, 4))
    )
    exp = (int(rng.integers(2026, 2036)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    values = {
        "name": f"{person.surname.upper()}, {person.given}",
        "number": number,
        "birth_date": f"{day:02d}.{m:02d}.{y}",
        "nationality": st.issuer,
        "expiry": f"{exp[2]:02d}.{exp[1]:02d}.{exp[0]}",
    }
    tampering = TAMPERING[int(rng.choice(3, p=TAMPER_P))]
    edited = str(rng.choice(["name", "number", "birth_date"])) if tampering == "text_edit" else None
    vf = fonts.get_font(st.face, t.value_size)
    boxes: dict[str, Box] = {"portrait": t.portrait}
    for name, (x, y0) in t.values.items():
        if name not in values:
            continue
        d.text((x, y0), values[name], font=vf, fill=st.text)
        if name in ("name", "number", "birth_date"):
            boxes[name] = d.textbbox((x, y0), values[name], font=vf)

    # portrait + ghost image of the holder
    _paste_portrait(img, person.face, t.portrait, soft=True)
    gx0, gy0, gx1, gy1 = (round(v) for v in t.ghost)
    ghost = draw_face(person.face, (gx1 - gx0, gy1 - gy0)).convert("L").convert("RGB")
    region = img.crop((gx0, gy0, gx1, gy1))
    img.paste(Image.blend(region, ghost, 0.35), (gx0, gy0))
    info: dict[str, Any] = {"values": values}

    if tampering == "portrait_swap":
        _swap_portrait(rng, img, t, doc_width, info)
    elif tampering == "text_edit" and edited is not None:
        new_val = values[edited]
        if edited == "birth_date":
            new_val = f"{day:02d}.{m:02d}.{y + int(rng.integers(-15, -3))}"
        elif edited == "name":
            new_val = f"{_word(rng, 2).upper()}, {person.given}"
        elif edited == "number":
            new_val = number[:-3] + "".join(str(v) for v in rng.integers(0, 10, 3))
        boxes[edited] = _edit_text(rng, img, t, boxes[edited], t.values[edited], new_val, info)
        info["edited_field"] = edited

    if t.mrz is not None:
        # the holder's fields, the same in both formats
        holder = {
            "issuer": st.issuer,
            "surname": person.surname,
            "given": person.given,
            "number": number,
            "nationality": st.issuer,
            "birth": _ymd(*person.birth),
            "sex": person.sex,
            "expiry": _ymd(*exp),
        }
        if st.mrz == "td3":
            lines = mrz.td3_lines(**holder)
        else:
            lines = mrz.td1_lines(doc_code="ID" if st.doc_type.endswith("id_card") else "IR", **holder)
        mf = fonts.get_font(fonts.MONO, t.mrz_size)
        x0, y0, x1, y1 = t.mrz
        lh = (y1 - y0) / len(lines)
        for i, line in enumerate(lines):
            d.text((x0 + (x1 - x0) / 2, y0 + lh * (i + 0.5)), line, font=mf, fill=(20, 20, 20), anchor="mm")
        boxes["mrz"] = t.mrz
        info["mrz"] = list(lines)

    hologram = None
    if t.hologram is not None and foil:
        boxes["hologram"] = t.hologram
        # the printed appearance: the same distribution for genuine and counterfeit (the class shows in frames)
        hologram = {
            "box": t.hologram,
            "hue": float(rng.random()),
            "sat": float(rng.uniform(0.35, 0.7)),
            "val": float(rng.uniform(0.7, 0.95)),
            "alpha": float(rng.uniform(0.45, 0.7)),
            "shape": st.hologram,
        }
    return Document(doc_type, t, img, boxes, tampering, hologram, info)


def hologram_layer(
    holo: dict[str, Any], size: tuple[int, int], *, dhue: float = 0.0, dval: float = 0.0, flare: float = 0.0
) -> tuple[Image.Image, Image.Image]:
    """The iridescent patch (RGB) and its alpha (L) at ``size``; ``dhue``/``dval`` shift it, ``flare`` adds a
    specular highlight (what a genuine diffractive foil does under tilt and flash)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = x / max(w - 1, 1), y / max(h - 1, 1)
    hue = (holo["hue"] + dhue + 0.25 * u + 0.15 * np.sin(6 * v)) % 1.0
    sat = np.full_like(hue, holo["sat"])
    val = np.clip(holo["val"] + dval + 0.05 * np.sin(9 * (u + v)), 0, 1)
    if flare > 0:
        g = np.exp(-((u - 0.45) ** 2 + (v - 0.4) ** 2) / 0.08)
        val = np.clip(val + flare * g, 0, 1)
        sat = sat * (1 - 0.8 * flare * g)
    hsv = np.stack([hue, sat, val], -1) * 255
    patch = Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV").convert("RGB")
    mask = Image.new("L", size, 0)
    md = ImageDraw.Draw(mask)
    a = int(255 * holo["alpha"] + 255 * 0.3 * flare)
    if holo["shape"] == "circle":
        md.ellipse([0, 0, w - 1, h - 1], fill=min(a, 255))
    else:
        md.rounded_rectangle([0, 0, w - 1, h - 1], radius=w // 6, fill=min(a, 255))
    return patch, mask
