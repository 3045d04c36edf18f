"""Shared fixtures.

``tiny_dataset`` is a small hand-made dataset folder in the documented format (docs/data-format.md), drawn with
PIL and using the default catalogue (idrecog/configs/synthetic_tasks.yaml): every task type, multi-frame
samples with flash + angle frames, user info, PNG and JPEG images, and on purpose some gaps:

* train line 2: ``tampering`` and ``image_quality`` null; train line 3: ``card_mask`` null and a user attribute null;
* train line 5 (cst_passport): no user info although ``nationality_match`` is labelled (masked at load);
* train line 8 (ald_passport): ``hologram`` labelled but no frames in the manifest (masked at load);
* the last line of every split has no ``doc_type`` (all tasks apply).

``make_tiny_dataset(root, ...)`` (via the ``tiny_dataset_factory`` fixture) writes one with other sizes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from idrecog.tasks.catalogue import TaskCatalogue, default_catalogue

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _repo_changes() -> set[str] | None:
    """`git status --porcelain` lines of the checkout (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.splitlines())


@pytest.fixture(scope="session", autouse=True)
def _tests_leave_the_checkout_alone():
    """A test that writes into the repository (e.g. LightningCLI's config.yaml without a logger lands in the
    working directory) fails the session instead of being committed by accident; ignored folders (runs/, data/)
    do not count."""
    before = _repo_changes()
    yield
    after = _repo_changes()
    if before is not None and after is not None and after - before:
        pytest.fail(f"the tests changed the checkout: {sorted(after - before)}", pytrace=False)


TINY_SIZE = (64, 96)  # (H, W): a multiple of 16 and 32, aspect 1.5
NATIONS = {"ald": "ALD", "brv": "BRV", "cst": "CST"}


def _draw_sample(
    rng: random.Random, h: int, w: int, with_hologram: bool
) -> tuple[Image.Image, np.ndarray, list[dict[str, Any]]]:
    """A card on a background, its segmentation mask (0 bg, 1 document, 2 portrait, 3 mrz) and field boxes."""
    bg = tuple(rng.randint(0, 80) for _ in range(3))
    card = tuple(rng.randint(170, 230) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    mask = Image.new("L", (w, h), 0)
    d, m = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    mx, my = rng.randint(2, w // 10), rng.randint(2, h // 10)
    x0, y0, x1, y1 = mx, my, w - 1 - rng.randint(2, w // 10), h - 1 - rng.randint(2, h // 10)
    d.rectangle([x0, y0, x1, y1], fill=card)
    m.rectangle([x0, y0, x1, y1], fill=1)
    cw, ch = x1 - x0, y1 - y0
    boxes: list[dict[str, Any]] = []

    def put(
        label: str, box: tuple[int, int, int, int], colour: tuple[int, int, int], cls: int | None = None
    ) -> None:
        bx0, by0, bx1, by1 = box
        d.rectangle([bx0, by0, bx1 - 1, by1 - 1], fill=colour)
        if cls is not None:
            m.rectangle([bx0, by0, bx1 - 1, by1 - 1], fill=cls)
        boxes.append({"box": [bx0, by0, bx1, by1], "label": label})

    put(
        "portrait",
        (x0 + cw // 16, y0 + ch // 8, x0 + cw // 16 + cw // 4, y0 + ch // 8 + ch // 2),
        (120, 90, 70),
        2,
    )
    tx = x0 + cw // 16 + cw // 4 + 3
    put("name", (tx, y0 + ch // 8, min(x1 - 2, tx + cw // 3), y0 + ch // 8 + 3), (20, 20, 20))
    put("number", (tx, y0 + ch // 8 + 6, min(x1 - 2, tx + cw // 4), y0 + ch // 8 + 9), (30, 30, 90))
    put("birth_date", (tx, y0 + ch // 8 + 12, min(x1 - 2, tx + cw // 5), y0 + ch // 8 + 15), (40, 40, 40))
    put("mrz", (x0 + 2, y1 - ch // 5, x1 - 2, y1 - 2), (60, 60, 60), 3)
    if with_hologram:
        put("hologram", (x1 - cw // 5, y0 + 3, x1 - 3, y0 + 3 + ch // 5), (200, 170, 60))
    return img, np.asarray(mask), boxes


def make_tiny_dataset(
    root: str | Path,
    *,
    n_train: int = 12,
    n_val: int = 6,
    n_test: int = 6,
    height: int = TINY_SIZE[0],
    width: int = TINY_SIZE[1],
    seed: int = 0,
    task_types: Collection[str] | None = None,
) -> Path:
    """Write a small dataset folder (tasks.yaml, {train,val,test}.jsonl, images/, masks/, frames/) and return it.

    ``task_types``: keep only the catalogue's tasks of these types (e.g. ``{"classification"}``), in tasks.yaml,
    its doc types and the labels.
    """
    root = Path(root)
    for sub in ("images", "masks", "frames"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cat = default_catalogue()
    if task_types is not None:
        keep = [t for t in cat if t.type in task_types]
        kept = {t.name for t in keep}
        doc_types = {d: [n for n in ts if n in kept] for d, ts in (cat.doc_types or {}).items()}
        written = TaskCatalogue(keep, doc_types)
    else:
        kept, written = set(cat.names), cat
    written.to_yaml(root / "tasks.yaml")
    doc_types = list(cat.doc_types or {})
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        lines = []
        for i in range(n):
            sid = f"{split}_{i:03d}"
            dt = doc_types[i % len(doc_types)]
            tasks = cat.tasks_for(dt)
            has_holo = "hologram" in tasks
            img, mask, boxes = _draw_sample(rng, height, width, has_holo)
            ext = "png" if i % 2 == 0 else "jpg"
            img.save(root / "images" / f"{sid}.{ext}", quality=95)
            Image.fromarray(mask).save(root / "masks" / f"{sid}.png")
            labels: dict[str, Any] = {
                "doc_type": dt,
                "tampering": cat["tampering"].classes[i % 3],  # type: ignore[index]
                "visibility": cat["visibility"].classes[(i // 2) % 3],  # type: ignore[index]
                "image_quality": round(rng.uniform(0.1, 0.95), 3),
                "card_mask": f"masks/{sid}.png",
                "fields": boxes,
            }
            line: dict[str, Any] = {
                "id": sid,
                "image": f"images/{sid}.{ext}",
                "doc_type": dt,
                "labels": labels,
            }
            if has_holo:
                genuine = i % 2 == 0
                labels["hologram"] = "genuine" if genuine else "counterfeit"
                frames = []
                for k, gain in enumerate((1.5, 0.8, 1.1)):
                    arr = np.asarray(img).astype(np.float32) * gain
                    if genuine and k:
                        arr[..., k % 3] += 40.0  # the hologram shifts colour with the angle
                    frames.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
                names = [f"frames/{sid}_flash.png", f"frames/{sid}_a0.png", f"frames/{sid}_a1.png"]
                for f, name in zip(frames, names, strict=True):
                    f.save(root / name)
                line["assoc"] = {"flash": names[0], "angles": names[1:]}
            if "nationality_match" in tasks:
                others = sorted(set(NATIONS.values()) - {NATIONS[dt[:3]]})
                declared = NATIONS[dt[:3]] if i % 3 else others[i % 2]
                labels["nationality_match"] = "match" if declared == NATIONS[dt[:3]] else "mismatch"
                line["user"] = {
                    "attributes": {
                        "declared_nationality": declared,
                        "age_band": ["18-30", "31-50", "51+"][i % 3],
                    },
                    "behaviour": {
                        "session_seconds": round(rng.uniform(20, 300), 1),
                        "retries": i % 4,
                        "device": "mobile" if i % 2 else "desktop",
                    },
                }
            if split == "train" and i == 1:
                labels["tampering"] = None
                labels["image_quality"] = None
            if split == "train" and i == 2:
                labels["card_mask"] = None
                if "user" in line:
                    line["user"]["attributes"]["age_band"] = None
            if split == "train" and i == 4:
                line.pop("user", None)
            if split == "train" and i == 7 and has_holo:
                line.pop("assoc", None)
            if i == n - 1 and n > 1:
                line.pop("doc_type")
            line["labels"] = {k: v for k, v in labels.items() if k in kept}
            lines.append(json.dumps(line))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A small dataset folder (12 train, 6 val, 6 test samples of 64 x 96 pixels); see the module docstring."""
    return make_tiny_dataset(tmp_path / "tiny")


@pytest.fixture
def tiny_dataset_factory(tmp_path: Path) -> Callable[..., Path]:
    """``factory(name="tiny", **kwargs)`` -> a dataset folder written by ``make_tiny_dataset(**kwargs)``."""

    def factory(name: str = "tiny", **kwargs: Any) -> Path:
        return make_tiny_dataset(tmp_path / name, **kwargs)

    return factory


def run_ddp_worker(script: str, args: list[str], cwd: Path, timeout: float) -> None:
    """Run a two-process DDP worker script (its source in ``script``) on CPU from ``cwd`` with ``args``; fail the test
    when it hangs (a rank stuck in a collective the other never joins) or exits non-zero."""
    path = cwd / "ddp_worker.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update({"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"})
    env.pop("MASTER_PORT", None)
    try:
        proc = subprocess.run(
            [sys.executable, str(path), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"DDP run hung (a collective joined by one rank only?):\n{(e.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stderr[-4000:]


def quiet_trainer(root: Path, **kwargs: Any) -> Any:
    """A CPU ``lightning.Trainer`` writing nothing but what ``kwargs`` ask for: no logger, checkpoints, progress bar,
    model summary or sanity validation."""
    import lightning as L

    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
