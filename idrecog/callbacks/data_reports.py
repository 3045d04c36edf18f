"""Per-epoch data reports the training CLI installs when they apply (``IdrecogCLI``):

* :class:`SkipReport` (``data.on_error: skip``): samples dropped before training (the DataModule's pre-flight
  scan) and at load time, printed at the end of each epoch and in a final summary;
* :class:`MaskedLabelReport` (catalogues with multi-frame tasks): labels masked because the frames a task reads
  were missing, printed and logged as ``data/{stage}_frames_missing/{task}``.

Both count on the collated batches in the main process, so they are right with any ``num_workers``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from idrecog.tasks.catalogue import TaskCatalogue

log = logging.getLogger(__name__)

__all__ = ["MaskedLabelReport", "SkipReport"]


class MaskedLabelReport(Callback):
    """Counts, per epoch and stage, the labels masked because a multi-frame task's frames were missing, then
    prints and logs them (``data/{stage}_frames_missing/{task}``) at epoch end.

    Counting happens on the collated batches in the main process, so it is right with any ``num_workers``.
    The DataModule adds this callback to the trainer in ``setup`` when the catalogue has multi-frame tasks.
    """

    def __init__(self, catalogue: TaskCatalogue) -> None:
        self.names = catalogue.names
        self.frame_tasks = [j for j, s in enumerate(catalogue) if s.uses_frames]
        self.counts: dict[str, torch.Tensor] = {}
        #: the last report per stage: {task: count}
        self.last: dict[str, dict[str, int]] = {}

    def _add(self, stage: str, batch: Any) -> None:
        fm = batch.get("frames_missing") if isinstance(batch, dict) else None
        if fm is None:
            return
        c = fm.sum(0).cpu()
        self.counts[stage] = self.counts.get(stage, torch.zeros_like(c)) + c

    def _report(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        c = self.counts.pop(stage, None)
        if c is None or trainer.sanity_checking:
            return
        report = {self.names[j]: int(c[j]) for j in self.frame_tasks}
        self.last[stage] = report
        if any(report.values()):
            text = ", ".join(f"{k}: {v}" for k, v in report.items() if v)
            rank_zero_info(
                f"[data] {stage} epoch {trainer.current_epoch}: labels masked for missing frames: {text}"
            )
        for k, v in report.items():
            try:
                pl_module.log(
                    f"data/{stage}_frames_missing/{k}",
                    float(v),
                    on_step=False,
                    on_epoch=True,
                    reduce_fx="sum",
                )
            except Exception:  # logging is best effort: never fail an epoch over a counter
                log.debug("could not log masked-label counts", exc_info=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self._add("train", batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:  # type: ignore[override]
        self._add("val", batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[override]
        self._add("test", batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._report("train", trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._report("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._report("test", trainer, pl_module)


class SkipReport(Callback):
    """Counts the samples dropped under ``data.on_error: skip`` and reports them.

    Pre-flight drops ({split: {reason: n}}) are known before training: given as ``preflight``, or read from the
    DataModule's ``skipped`` after its ``setup``. Load-time drops arrive in the batches (``batch["skipped"]``:
    {reason: n}, counted in the main process, so right with any ``num_workers``). Printed at the end of every
    epoch that dropped something, and summarised at the end of fit.
    """

    def __init__(self, preflight: dict[str, dict[str, int]] | None = None) -> None:
        self._given = preflight is not None
        self.preflight = {k: dict(v) for k, v in (preflight or {}).items()}
        self._epoch: dict[str, Counter[str]] = {}
        #: load-time drops over the whole run, per stage
        self.total: dict[str, Counter[str]] = {}
        #: the last epoch's report per stage (pre-flight + load time): {reason: n}
        self.last: dict[str, dict[str, int]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the DataModule's setup (its pre-flight scan) runs before the callbacks' setup
        skipped = getattr(trainer.datamodule, "skipped", None)
        if not self._given and skipped is not None:
            self.preflight = {k: dict(v) for k, v in skipped.items()}

    def _add(self, stage: str, batch: Any) -> None:
        skipped = batch.get("skipped") if isinstance(batch, dict) else None
        if skipped:
            self._epoch.setdefault(stage, Counter()).update(skipped)
            self.total.setdefault(stage, Counter()).update(skipped)

    def _report(self, stage: str, split: str, trainer: L.Trainer) -> None:
        if trainer.sanity_checking:
            self._epoch.pop(stage, None)
            return
        loaded = self._epoch.pop(stage, Counter())
        pre = self.preflight.get(split, {})
        self.last[stage] = dict(Counter(pre) + loaded)
        if pre or loaded:
            parts = []
            if pre:
                parts.append("pre-flight " + _fmt(pre))
            if loaded:
                parts.append("at load time " + _fmt(loaded))
            rank_zero_info(
                f"[data] {stage} epoch {trainer.current_epoch}: samples skipped: " + "; ".join(parts)
            )

    def summary(self) -> str:
        """One line per split/stage with skips, or '' when nothing was skipped."""
        lines = []
        for split, counts in self.preflight.items():
            if counts:
                lines.append(f"  {split}: {sum(counts.values())} skipped before training ({_fmt(counts)})")
        for stage, counts in self.total.items():
            if counts:
                lines.append(
                    f"  {stage}: {sum(counts.values())} skipped at load time over the run ({_fmt(counts)})"
                )
        return "\n".join(lines)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self._add("train", batch)

    def on_validation_batch_end(  # type: ignore[override]
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._add("val", batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[override]
        self._add("test", batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._report("train", "train", trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._report("val", "val", trainer)

    def on_test_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        self._report("test", "test", trainer)

    def on_fit_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        text = self.summary()
        if text:
            rank_zero_info("[data] skipped samples (data.on_error: skip):\n" + text)


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
