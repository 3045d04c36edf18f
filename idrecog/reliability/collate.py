"""Collation that copes with samples dropped at load time (``data.on_error: skip``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from idrecog.data.catalogue import TaskCatalogue
from idrecog.data.collate import Collator
from idrecog.data.dataset import SKIPPED

__all__ = ["SkippingCollator"]


class SkippingCollator:
    """Drops the ``{SKIPPED: reason}`` placeholders ``IdDataset`` returns under ``on_error="skip"``, collates
    the rest with :class:`idrecog.data.collate.Collator` and adds ``batch["skipped"]`` = {reason: count}.

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
