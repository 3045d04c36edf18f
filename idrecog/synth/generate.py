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
    frame_capture,
    hand_mask,
    jitter_placement,
    polygon_area,
    project,
    sample_capture,
    sample_placement,
    screen_replay,
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
#: how far a hand-held flash or angle frame's document corners move from the main capture's (of its extent)
HANDHELD_JITTER = 0.04
#: share of capture sessions that are presentation attacks (half screen replays, half injections)
ATTACK_P = 0.3
#: what the generator draws; written to ``synth.json`` so a dataset from another version is recognised
BENCHMARK_VERSION = 2
FRAMES_MODES = ("handheld", "registered")
SETTINGS_FILE = "synth.json"


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
    seed: int, split: str, index: int, height: int, width: int, frames_mode: str = "handheld"
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
    attack = _presentation_attack(rng)

    scene = _composite(doc, {}, place.h, bg, size)
    mask = np.asarray(warp(doc.template.classes, place.h, size, Image.Resampling.NEAREST)).copy()
    doc_area_px = int((mask > 0).sum())
    # the hand that holds the document: one shape, drawn again wherever the document moves
    hand_seed = int(rng.integers(2**31)) if place.occluder else None
    skin = np.array([rng.uniform(150, 240), rng.uniform(100, 190), rng.uniform(70, 150)], np.float32)
    hand = _hand(hand_seed, skin, place.corners, size)
    if hand is not None:
        scene = _with_hand(scene, hand)
        mask[hand[0][..., 0] > 0.5] = 0
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

    cap = sample_capture(rng, place.corners, width)
    if attack == "screen_replay":
        scene = screen_replay(scene, rng, cap.px_scale)
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
        "behaviour": _behaviour(rng, attack),
    }

    determinable = visibility != "none"
    paths = _paths(split, sid)
    labels: dict[str, Any] = {
        "doc_type": doc_type if determinable else None,
        "tampering": doc.tampering if determinable and _cue_seen(doc, place.h, size, hand) else None,
        "visibility": visibility,
        "image_quality": round(cap.quality(), 4),
        "card_mask": paths["mask"],
        "fields": fields,
        "presentation_attack": "attack" if attack else "bona_fide",
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
    frame_boxes: list[list[float] | None] = []  # the hologram's image box in each frame (flash, angles...)
    if doc.hologram is not None:
        genuine = holo_class == "genuine"

        def frame(holo: dict[str, float], flash: float = 0.0) -> bytes:
            # hand-held: every frame has its own pose, exposure, focus, noise and compression
            if frames_mode == "registered":
                h, corners, fcap = place.h, place.corners, cap
            else:
                h, corners = jitter_placement(frame_rng, doc.template.size, place.corners, HANDHELD_JITTER)
                fcap = frame_capture(frame_rng, cap)
            frame_boxes.append(box_in_image(h, doc.boxes["hologram"], size))
            img = _with_hand(_composite(doc, holo, h, bg, size), _hand(hand_seed, skin, corners, size))
            if attack == "screen_replay":
                img = screen_replay(img, frame_rng, cap.px_scale)
            return degrade(img, fcap, frame_rng, flash=flash)

        angles = []
        for k in range(N_ANGLES):
            if genuine:  # diffractive foil: hue and brightness change with the tilt
                sign = 1 if k % 2 == 0 else -1
                holo = {"dhue": sign * float(rng.uniform(0.15, 0.35)), "dval": float(rng.uniform(-0.3, 0.1))}
            else:  # printed copy: static up to re-photographing noise
                holo = {"dhue": float(rng.normal(0, 0.005)), "dval": float(rng.normal(0, 0.01))}
            angles.append(frame(holo))
        flare = {"flare": float(rng.uniform(0.6, 1.0))} if genuine else {}
        frames = {"flash": frame(flare, flash=1.0), "angles": angles}
        frame_boxes = frame_boxes[-1:] + frame_boxes[:-1]  # flash first, as in ``frames``

    mask_img = Image.fromarray(mask.astype(np.uint8), "L")
    extra = {
        "capture": cap,
        "visible_fraction": frac,
        "hologram_box_doc": doc.boxes.get("hologram"),
        "tampering_drawn": doc.tampering,
        "attack_drawn": attack,
        "cue_box_image": _cue_box(doc, place.h, size),
        "cue_detail_px": _cue_detail_px(doc, place.h, size),
        "frame_hologram_boxes": frame_boxes,
        "mrz": doc.info.get("mrz"),
        "paths": paths,
    }
    return Rendered(sid, doc_type, jpeg, mask_img, frames, labels, user, extra), rest


def _presentation_attack(rng: np.random.Generator) -> str | None:
    """None for a bona fide session, else the attack: a screen replay (seen in the image, played with patience)
    or an injection (a clean image pushed through an emulator: seen in the behaviour)."""
    if rng.random() >= ATTACK_P:
        return None
    return "screen_replay" if rng.random() < 0.5 else "injection"


def _behaviour(rng: np.random.Generator, attack: str | None) -> dict[str, Any]:
    """Attempts, seconds on the capture step, device and how often it changed within the session. Injections
    are fast, retried and hop devices; a replay and a bona fide session behave alike; a few bona fide users
    are fast or retry too."""
    if attack == "injection":
        return {
            "attempts": int(1 + rng.poisson(3.0)),
            "seconds": round(float(rng.lognormal(0.9, 0.5)), 2),
            "device": str(rng.choice(DEVICES, p=(0.25, 0.15, 0.6))),
            "device_changes": int(rng.random() < 0.75) + int(rng.poisson(0.6)),
        }
    hurried = rng.random() < 0.05
    return {
        "attempts": int(rng.geometric(0.6)) + (int(rng.integers(1, 4)) if hurried else 0),
        "seconds": round(float(rng.lognormal(1.2 if hurried else 3.0, 0.6)), 2),
        "device": str(rng.choice(DEVICES)),
        "device_changes": int(rng.random() < (0.3 if hurried else 0.04)),
    }


def _hand(
    seed: int | None, skin: np.ndarray, corners: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The occluding hand at ``corners`` (alpha [H, W, 1], colour [H, W, 3]); None without one. The same
    ``seed`` draws the same hand relative to the document."""
    if seed is None:
        return None
    hm = np.asarray(hand_mask(np.random.default_rng(seed), corners, size), np.float32)[..., None] / 255.0
    shade = 0.8 + 0.2 * np.linspace(0, 1, size[0], dtype=np.float32)[None, :, None]
    return hm, skin * shade


def _cue_detail_px(doc: Document, h: np.ndarray, size: tuple[int, int]) -> float | None:
    """How large the forgery's finest cue is in image pixels: the re-print halo's width (portrait swap) or the
    edited text's height (text edit), by the scale of the document where the cue lies."""
    box = doc.info.get("cue_box")
    if box is None:
        return None
    pts = project(h, np.array([[box[0], box[1]], [box[2], box[1]], [box[0], box[3]]], np.float64))
    scale = float(np.linalg.norm(pts[1] - pts[0])) / max(box[2] - box[0], 1e-6)
    detail = doc.info.get("halo_px") if doc.tampering == "portrait_swap" else doc.template.value_size
    return round(float(detail) * scale, 2)


def _cue_box(doc: Document, h: np.ndarray, size: tuple[int, int]) -> list[float] | None:
    """The image box of the forgery's cue (the pasted photo with its halo, the edited field), clipped."""
    box = doc.info.get("cue_box")
    return box_in_image(h, box, size, min_inside=0.0) if box is not None else None


def _cue_seen(
    doc: Document, h: np.ndarray, size: tuple[int, int], hand: tuple[np.ndarray, np.ndarray] | None
) -> bool:
    """Whether a forgery can be seen: its cue region mostly inside the frame and not under the hand (a genuine
    document is labelled whenever it is visible)."""
    box = doc.info.get("cue_box")
    if doc.tampering == "genuine" or box is None:
        return True
    b = box_in_image(h, box, size, min_inside=0.7)
    if b is None:
        return False
    if hand is not None:
        x0, y0, x1, y1 = (int(v) for v in b)
        if float(hand[0][y0 : y1 + 1, x0 : x1 + 1].mean()) > 0.3:
            return False
    return True


def _with_hand(img: np.ndarray, hand: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    # the hand holds still across the frames of one capture
    if hand is None:
        return img
    alpha, colour = hand
    return img * (1 - alpha) + colour * alpha


def render_sample(
    seed: int, split: str, index: int, height: int = 160, width: int = 256, frames: str = "handheld"
) -> dict[str, Any]:
    """Render one sample in memory, exactly as ``generate_dataset`` writes it (before label blanking).

    Returns {"id", "image": PIL RGB [height x width] (decoded from the written JPEG), "frames": {"flash": PIL,
    "angles": [PIL, ...]} or {}, "labels": complete labels, "mask": PIL L of card_mask classes, "doc_type",
    "user", "capture": degradation parameters, "mrz": MRZ lines or None, "attack": the presentation attack
    drawn or None, "tampering_drawn", "cue_box": the forgery cue's image box or None, "cue_detail_px": its finest
    detail in image pixels (halo width, edited text height) or None, "frame_hologram_boxes": the
    hologram's image box in each frame, flash first (None where out of it)}.
    """
    r, _ = _render(seed, split, index, height, width, frames)

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
        "attack": r.extra["attack_drawn"],
        "tampering_drawn": r.extra["tampering_drawn"],
        "cue_box": r.extra["cue_box_image"],
        "cue_detail_px": r.extra["cue_detail_px"],
        "frame_hologram_boxes": r.extra["frame_hologram_boxes"],
    }


def doc_type_of(seed: int, split: str, index: int) -> str:
    """The document type of a sample without rendering it (the first draw of its render stream)."""
    return DOC_TYPES[int(_streams(seed, split, index)[0].integers(len(DOC_TYPES)))]


# ------------------------------------------------------------------------------------------------ dataset
def _write_chunk(args: tuple[str, int, str, int, int, int, int, float, float, str]) -> list[str]:
    """Render samples [start, stop) of a split into ``root``; return their manifest lines (JSON)."""
    root, seed, split, start, stop, height, width, missing, drop, frames_mode = args
    out = []
    for index in range(start, stop):
        r, (label_rng, opt_rng) = _render(seed, split, index, height, width, frames_mode)
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
        cue = r.extra["cue_box_image"]
        if cue is not None and r.labels.get("tampering") not in (None, "genuine"):
            line["evidence"] = {"tampering": cue}
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
    frames: str = "handheld",
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
    if frames not in FRAMES_MODES:
        raise ConfigError(f"--frames must be one of {FRAMES_MODES}, got {frames!r}")


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
    frames: str = "handheld",
    progress: bool = True,
) -> Path:
    """Write the benchmark to ``out`` (tasks.yaml, {train,val,test}.jsonl, images/, masks/, frames/, synth.json).

    ``frames``: ``handheld`` (every flash and angle frame with its own pose, exposure, focus and noise, as a phone
    in a hand takes them) or ``registered`` (the frames reuse the main capture's geometry and degradations, pixel
    aligned: a control that shows what a pixel difference alone finds).

    Everything is written to a temporary folder beside ``out`` and renamed into place at the end; a non-empty
    ``out`` needs ``overwrite=True``. Returns ``out``.
    """
    _check_args(train, val, test, height, width, workers, missing_fraction, drop_doc_type, frames)
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
        settings = {"benchmark_version": BENCHMARK_VERSION, "seed": seed, "height": height, "width": width}
        settings |= {"train": train, "val": val, "test": test, "frames": frames}
        settings |= {"missing_fraction": missing_fraction, "drop_doc_type": drop_doc_type}
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
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
                frames,
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
