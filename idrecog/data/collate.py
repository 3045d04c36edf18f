"""Batching ``IdDataset`` items into the batch contract the model consumes.

A batch::

    image:    float [B, 3, H, W]
    applies:  bool [B, T]      present: bool [B, T]      frames_missing: bool [B, T]
    applies_known: bool [B]    the sample's task set is known (not assumed)
    gate_decides: bool [B]     the model's gate decides which of the sample's tasks train
    targets:  {task: TaskType.collate(...)} for every catalogue task (segmentation: [B, H, W], 255 where absent)
    ids:      list[str]        doc_type: list[str | None]
    assoc:    {"flash": float [B, 3, H, W], "angles": float [B, A, 3, H, W], "mask": bool [B, 1 + A]}
              only when some item carries frames; A = most angle frames of an item in the batch
    user:     {"attributes": long [B, n_attr], "behaviour": float [B, n_beh], "behaviour_mask": bool [B, n_beh],
               "mask": bool [B]}  only when some item carries user info
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor

from idrecog.tasks.catalogue import TaskCatalogue
from idrecog.tasks.registry import create_task_type

#: what ``IdDataset`` returns instead of an item that failed to load under ``on_error="skip"``:
#: ``{SKIPPED: reason, "id": ...}``
SKIPPED = "skipped"


def _plain(t: Tensor) -> Tensor:
    return t.as_subclass(Tensor)


class Collator:
    """Picklable ``collate_fn`` for a catalogue (task types are created once, not per batch)."""

    def __init__(self, catalogue: TaskCatalogue) -> None:
        self.catalogue = catalogue
        self.task_types = [create_task_type(spec) for spec in catalogue]

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of samples")
        image = torch.stack([_plain(it["image"]) for it in items])
        size = (int(image.shape[-2]), int(image.shape[-1]))
        targets: dict[str, Any] = {}
        for spec, tt in zip(self.catalogue.tasks, self.task_types, strict=True):
            targets[spec.name] = tt.collate([it["targets"].get(spec.name) for it in items], size)
        batch: dict[str, Any] = {
            "image": image,
            "applies": torch.stack([it["applies"] for it in items]),
            "applies_known": torch.stack([it.get("applies_known", torch.tensor(True)) for it in items]),
            "gate_decides": torch.stack([it.get("gate_decides", torch.tensor(False)) for it in items]),
            "present": torch.stack([it["present"] for it in items]),
            "frames_missing": torch.stack(
                [it.get("frames_missing", torch.zeros_like(it["applies"])) for it in items]
            ),
            "targets": targets,
            "ids": [it["id"] for it in items],
            "doc_type": [it["doc_type"] for it in items],
        }
        if any("assoc" in it for it in items):
            batch["assoc"] = _collate_frames(items, image)
        if any("user" in it for it in items):
            batch["user"] = _collate_user(items)
        return batch


class SkippingCollator:
    """Drops the ``{SKIPPED: reason}`` placeholders ``IdDataset`` returns under ``on_error="skip"``, collates
    the rest with :class:`Collator` and adds ``batch["skipped"]`` = {reason: count}.

    A batch whose every sample was dropped becomes ``{"ids": [], "skipped": {...}}``; the model's steps
    skip it (Lightning skips the optimiser step when ``training_step`` returns None).
    """

    def __init__(self, catalogue: TaskCatalogue) -> None:
        self.collator = Collator(catalogue)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        kept = [it for it in items if SKIPPED not in it]
        skipped = dict(Counter(it[SKIPPED] for it in items if SKIPPED in it))
        if not kept:
            return {"ids": [], "doc_type": [], "skipped": skipped}
        batch = self.collator(kept)
        batch["skipped"] = skipped
        return batch


def collate_samples(items: list[dict[str, Any]], catalogue: TaskCatalogue) -> dict[str, Any]:
    """Batch dataset items per the batch contract (see the module docstring)."""
    return Collator(catalogue)(items)


def _collate_frames(items: list[dict[str, Any]], image: Tensor) -> dict[str, Tensor]:
    b, c, h, w = image.shape
    n_angles = max(len((it.get("assoc") or {}).get("angles") or []) for it in items)
    flash = image.new_zeros(b, c, h, w)
    angles = image.new_zeros(b, n_angles, c, h, w)
    mask = torch.zeros(b, 1 + n_angles, dtype=torch.bool)
    for i, it in enumerate(items):
        a = it.get("assoc") or {}
        if a.get("flash") is not None:
            flash[i] = _plain(a["flash"])
            mask[i, 0] = True
        for k, frame in enumerate(a.get("angles") or []):
            if frame is not None:
                angles[i, k] = _plain(frame)
                mask[i, 1 + k] = True
    return {"flash": flash, "angles": angles, "mask": mask}


def _collate_user(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    ref = next(it["user"] for it in items if "user" in it)
    out: dict[str, Tensor] = {}
    for key, t in ref.items():
        rows = [it["user"][key] if "user" in it else torch.zeros_like(t) for it in items]
        out[key] = torch.stack(rows)
    return out
