"""Render samples and write the synthetic benchmark folder.

Every sample is a pure function of ``(seed, split, index, height, width)``: its random stream is
``numpy.random.SeedSequence([seed, split id, index])``, so the bytes written do not depend on ``workers``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from idrecog.errors import ConfigError
from idrecog.synth.document import Document, hologram_layer, render_document
from idrecog.synth.scene import (
    background,
    box_in_image,
    degrade,
    hand_mask,
    polygon_area,
    sample_capture,
    sample_placement,
    warp,
)
from idrecog.synth.templates import STYLES

DOC_TYPES: tuple[str, ...] = tuple(STYLES)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
NATIONALITIES = ("ALD", "BRV", "CST", "DRN", "ELV", "FNX")
AGE_BANDS = ((18, 25, "18-25"), (26, 40, "26-40"), (41, 60, "41-60"), (61, 200, "60+"))
DEVICES = ("android", "ios", "desktop")
N_ANGLES = 2
REFERENCE_YEAR = 2025
#: a sample counts as "none" visible under this fraction of the document area inside the frame and unoccluded
NONE_BELOW = 0.2


@dataclass
class Rendered:
    """One rendered sample: encoded files plus complete labels (before annotation-backlog blanking)."""

    id: str
    doc_type: str
    jpeg: bytes
    mask: Image.Image
    frames: dict[str, Any]  # {"flash": bytes, "angles": [bytes, ...]} or {}
    labels: dict[str, Any]
    user: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _applicable_tasks() -> dict[str, list[str]]:
    # read the YAML directly: default_catalogue() validates through the task registry, which imports torch,
    # and render workers should not pay for that
    from importlib.resources import files

    import yaml

    text = files("idrecog").joinpath("configs/synthetic_tasks.yaml").read_text()
    return {k: list(v) for k, v in yaml.safe_load(text)["doc_types"].items()}


def sample_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _paths(split: str, sid: str) -> dict[str, Any]:
    return {
        "image": f"images/{split}/{sid}.jpg",
        "mask": f"masks/{split}/{sid}.png",
        "flash": f"frames/{split}/{sid}_flash.jpg",
        "angles": [f"frames/{split}/{sid}_angle{k + 1}.jpg" for k in range(N_ANGLES)],
    }


def _streams(seed: int, split: str, index: int) -> list[np.random.Generator]:
    """Independent generators: [render, frame noise, annotation backlog, manifest options]."""
    if split not in SPLIT_IDS:
        raise ConfigError(f"split must be one of {list(SPLIT_IDS)}, got {split!r}")
    ss = np.random.SeedSequence([int(seed), SPLIT_IDS[split], int(index)])
    return [np.random.default_rng(s) for s in ss.spawn(4)]


def _composite(
    doc: Document, holo: dict[str, float] | None, h: np.ndarray, bg: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Warp the document (with the hologram drawn as ``holo`` says) over the background: [H, W, 3] float32."""
    base = doc.info.get("_rgba")
    if base is None:
        # premultiplied alpha, so the bilinear edge blends with the background instead of with black
        rgba = doc.image.convert("RGBA")
        rgba.putalpha(doc.template.alpha)
        base = doc.info["_rgba"] = rgba.convert("RGBa")
    img = base
    if doc.hologram is not None and holo is not None:
        img = base.copy()
        x0, y0, x1, y1 = (round(v) for v in doc.hologram["box"])
        patch, pmask = hologram_layer(doc.hologram, (x1 - x0, y1 - y0), **holo)
        img.paste(patch.convert("RGBa"), (x0, y0), pmask)  # inside the card: alpha 255, so RGBa == RGBA
    w = np.asarray(warp(img, h, size, Image.Resampling.BILINEAR), np.float32)
    a = w[..., 3:4] * np.float32(1 / 255)
    return bg * (1 - a) + w[..., :3]


def _render(
    seed: int, split: str, index: int, height: int, width: int
) -> tuple[Rendered, list[np.random.Generator]]:
    rng, frame_rng, *rest = _streams(seed, split, index)
    size = (width, height)
    sid = sample_id(split, index)
    doc_type = DOC_TYPES[int(rng.integers(len(DOC_TYPES)))]
    style = STYLES[doc_type]
    doc = render_document(rng, doc_type, doc_width=2 * width)
    place = sample_placement(rng, doc.template.size, size)
    bg = background(rng, size)
    holo_class = None
    if doc.hologram is not None:
        holo_class = "genuine" if rng.random() < 0.5 else "counterfeit"

    scene = _composite(doc, {}, place.h, bg, size)
    mask = np.asarray(warp(doc.template.classes, place.h, size, Image.Resampling.NEAREST)).copy()
    doc_area_px = int((mask > 0).sum())
    hand = None
    if place.occluder:
        hm = np.asarray(hand_mask(rng, place.corners, size), np.float32)[..., None] / 255.0
        skin = np.array([rng.uniform(150, 240), rng.uniform(100, 190), rng.uniform(70, 150)], np.float32)
        shade = 0.8 + 0.2 * np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
        hand = (hm, skin * shade)
        scene = _with_hand(scene, hand)
        mask[hm[..., 0] > 0.5] = 0
    occluded = doc_area_px - int((mask > 0).sum())

    # visibility is measured on the geometry actually drawn
    area = polygon_area(place.corners)
    frac = float((mask > 0).sum()) / max(area, 1.0)
    W, H = size
    inside = bool(np.all((place.corners >= -0.5) & (place.corners <= [W + 0.5, H + 0.5])))
    if frac < NONE_BELOW:
        visibility = "none"
    elif inside and occluded == 0:
        visibility = "full"
    else:
        visibility = "partial"

    cap = sample_capture(rng, place.corners)
    jpeg = degrade(scene, cap, rng)

    fields = []
    kept: dict[str, list[float]] = {}
    for name in ("portrait", "name", "number", "birth_date", "mrz", "hologram"):
        if name in doc.boxes:
            b = box_in_image(place.h, doc.boxes[name], size)
            if b is not None and b[2] - b[0] >= 1 and b[3] - b[1] >= 1:
                fields.append({"box": b, "label": name})
                kept[name] = b

    # user: declared nationality matches the issuing country half of the time (types that state nationality)
    nat_match = None
    if style.states_nationality:
        nat_match = "match" if rng.random() < 0.5 else "mismatch"
        nationality = (
            style.issuer
            if nat_match == "match"
            else str(rng.choice([n for n in NATIONALITIES if n != style.issuer]))
        )
    else:
        nationality = str(rng.choice(NATIONALITIES))
    age = REFERENCE_YEAR - int(doc.info["values"]["birth_date"][-4:])
    band = next(b for lo, hi, b in AGE_BANDS if lo <= max(age, 18) <= hi)
    user = {
        "attributes": {"nationality": nationality, "age_band": band},
        "behaviour": {
            "attempts": int(1 + rng.geometric(0.6) - 1),
            "seconds": round(float(rng.lognormal(3.0, 0.6)), 2),
            "device": str(rng.choice(DEVICES)),
        },
    }

    determinable = visibility != "none"
    tampering: str | None = doc.tampering if determinable else None
    # a forgery whose region is out of the frame cannot be seen
    if doc.tampering == "portrait_swap" and "portrait" not in kept:
        tampering = None
    if doc.tampering == "text_edit" and doc.info.get("edited_field") not in kept:
        tampering = None
    paths = _paths(split, sid)
    labels: dict[str, Any] = {
        "doc_type": doc_type if determinable else None,
        "tampering": tampering,
        "visibility": visibility,
        "image_quality": round(cap.quality(), 4),
        "card_mask": paths["mask"],
        "fields": fields,
    }
    if doc.hologram is not None:
        hidden = "hologram" not in kept
        if hand is not None and not hidden:
            x0, y0, x1, y1 = (int(v) for v in kept["hologram"])
            hidden = float(hand[0][y0 : y1 + 1, x0 : x1 + 1].mean()) > 0.3
        labels["hologram"] = holo_class if determinable and not hidden else None
    if style.states_nationality:
        labels["nationality_match"] = nat_match if determinable else None
    applies = _applicable_tasks()[doc_type]
    labels = {k: v for k, v in labels.items() if k in applies}

    frames: dict[str, Any] = {}
    if doc.hologram is not None:
        genuine = holo_class == "genuine"
        angles = []
        for k in range(N_ANGLES):
            if genuine:  # diffractive foil: hue and brightness change with the tilt
                sign = 1 if k % 2 == 0 else -1
                holo = {"dhue": sign * float(rng.uniform(0.15, 0.35)), "dval": float(rng.uniform(-0.3, 0.1))}
            else:  # printed copy: static up to re-photographing noise
                holo = {"dhue": float(rng.normal(0, 0.005)), "dval": float(rng.normal(0, 0.01))}
            angles.append(degrade(_with_hand(_composite(doc, holo, place.h, bg, size), hand), cap, frame_rng))
        flare = {"flare": float(rng.uniform(0.6, 1.0))} if genuine else {}
        fl = _with_hand(_composite(doc, flare, place.h, bg, size), hand)
        frames = {"flash": degrade(fl, cap, frame_rng, flash=1.0), "angles": angles}

    mask_img = Image.fromarray(mask.astype(np.uint8), "L")
    extra = {
        "capture": cap,
        "visible_fraction": frac,
        "hologram_box_doc": doc.boxes.get("hologram"),
        "tampering_drawn": doc.tampering,
        "mrz": doc.info.get("mrz"),
        "paths": paths,
    }
    return Rendered(sid, doc_type, jpeg, mask_img, frames, labels, user, extra), rest


def _with_hand(img: np.ndarray, hand: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    # the hand holds still across the frames of one capture
    if hand is None:
        return img
    alpha, colour = hand
    return img * (1 - alpha) + colour * alpha


def render_sample(seed: int, split: str, index: int, height: int = 160, width: int = 256) -> dict[str, Any]:
    """Render one sample in memory, exactly as ``generate_dataset`` writes it (before label blanking).

    Returns {"id", "image": PIL RGB [height x width] (decoded from the written JPEG), "frames": {"flash": PIL,
    "angles": [PIL, ...]} or {}, "labels": complete labels, "mask": PIL L of card_mask classes, "doc_type",
    "user", "capture": degradation parameters, "mrz": MRZ lines or None}.
    """
    r, _ = _render(seed, split, index, height, width)

    def dec(b: bytes) -> Image.Image:
        with Image.open(io.BytesIO(b)) as im:
            return im.convert("RGB")

    frames = (
        {"flash": dec(r.frames["flash"]), "angles": [dec(b) for b in r.frames["angles"]]} if r.frames else {}
    )
    return {
        "id": r.id,
        "image": dec(r.jpeg),
        "frames": frames,
        "labels": r.labels,
        "mask": r.mask,
        "doc_type": r.doc_type,
        "user": r.user,
        "capture": r.extra["capture"],
        "mrz": r.extra["mrz"],
    }


def doc_type_of(seed: int, split: str, index: int) -> str:
    """The document type of a sample without rendering it (the first draw of its render stream)."""
    return DOC_TYPES[int(_streams(seed, split, index)[0].integers(len(DOC_TYPES)))]


# ------------------------------------------------------------------------------------------------ dataset
def _write_chunk(args: tuple[str, int, str, int, int, int, int, float, float]) -> list[str]:
    """Render samples [start, stop) of a split into ``root``; return their manifest lines (JSON)."""
    root, seed, split, start, stop, height, width, missing, drop = args
    out = []
    for index in range(start, stop):
        r, (label_rng, opt_rng) = _render(seed, split, index, height, width)
        p = r.extra["paths"]
        base = Path(root)
        (base / p["image"]).write_bytes(r.jpeg)
        r.mask.save(base / p["mask"], format="PNG", optimize=False)
        labels = dict(r.labels)
        # annotation backlog: blank some labels, never a determinable doc_type
        for k in labels:
            if k != "doc_type" and labels[k] is not None and label_rng.random() < missing:
                labels[k] = None
        line: dict[str, Any] = {"id": r.id, "image": p["image"]}
        if not (split == "train" and opt_rng.random() < drop):
            line["doc_type"] = r.doc_type
        line["labels"] = labels
        if r.frames:
            (base / p["flash"]).write_bytes(r.frames["flash"])
            for path, b in zip(p["angles"], r.frames["angles"], strict=True):
                (base / path).write_bytes(b)
            line["assoc"] = {"flash": p["flash"], "angles": p["angles"]}
        line["user"] = r.user
        out.append(json.dumps(line, separators=(",", ":")))
    return out


def _check_args(
    train: int,
    val: int,
    test: int,
    height: int,
    width: int,
    workers: int,
    missing_fraction: float,
    drop_doc_type: float,
) -> None:
    for name, v in (("train", train), ("val", val), ("test", test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"--{name} must be a count >= 0, got {v!r}")
    for name, v in (("height", height), ("width", width), ("workers", workers)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"--{name} must be a positive integer, got {v!r}")
    if height < 32 or width < 32:
        raise ConfigError(f"image size {width}x{height} (W x H) is too small; use at least 32 x 32")
    for name, v in (("missing-fraction", missing_fraction), ("drop-doc-type", drop_doc_type)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"--{name} must be a fraction in [0, 1], got {v!r}")


def generate_dataset(
    out: str | Path,
    *,
    train: int = 2000,
    val: int = 300,
    test: int = 300,
    seed: int = 0,
    height: int = 160,
    width: int = 256,
    workers: int = 1,
    overwrite: bool = False,
    missing_fraction: float = 0.10,
    drop_doc_type: float = 0.0,
    progress: bool = True,
) -> Path:
    """Write the benchmark to ``out`` (tasks.yaml, {train,val,test}.jsonl, images/, masks/, frames/).

    Everything is written to a temporary folder beside ``out`` and renamed into place at the end; a non-empty
    ``out`` needs ``overwrite=True``. Returns ``out``.
    """
    _check_args(train, val, test, height, width, workers, missing_fraction, drop_doc_type)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        from idrecog.tasks.catalogue import default_catalogue

        default_catalogue().to_yaml(tmp / "tasks.yaml")
        counts = {"train": train, "val": val, "test": test}
        for split in counts:
            for sub in ("images", "masks", "frames"):
                (tmp / sub / split).mkdir(parents=True, exist_ok=True)
        chunk = 16
        jobs = [
            (
                str(tmp),
                seed,
                split,
                s,
                min(s + chunk, n),
                height,
                width,
                float(missing_fraction),
                float(drop_doc_type),
            )
            for split, n in counts.items()
            for s in range(0, n, chunk)
        ]
        lines: dict[str, list[str]] = {s: [] for s in counts}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(counts.values()), desc="idrecog synth", unit="sample")
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            # spawn: the parent may hold torch threads; rendering needs only numpy/PIL
            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for job, res in zip(jobs, pool.imap(_write_chunk, jobs), strict=True):
                    lines[job[2]].extend(res)
                    if bar is not None:
                        bar.update(len(res))
        else:
            for job in jobs:
                res = _write_chunk(job)
                lines[job[2]].extend(res)
                if bar is not None:
                    bar.update(len(res))
        if bar is not None:
            bar.close()
        for split, ls in lines.items():
            (tmp / f"{split}.jsonl").write_text("".join(x + "\n" for x in ls), encoding="utf-8")
        # swap into place: the old folder (if any) is removed only once the new one is complete
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "d")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
