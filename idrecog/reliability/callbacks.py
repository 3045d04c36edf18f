"""Training-time safety nets: atomic checkpoint writes, a checkpoint on SIGTERM, per-epoch skip reports.

* :class:`AtomicCheckpointIO`: Lightning writes checkpoints through an fsspec transaction whose temporary file
  lies in the system temp dir; when that is another filesystem the final move is a copy, so a kill mid-copy
  leaves a truncated ``last.ckpt``. This plug-in writes ``<name>.tmp-<pid>`` beside the target, fsyncs it and
  ``os.replace``-s it: a reader sees the old file or the new one, never a part.
* :class:`PreemptionCheckpoint`: Lightning turns SIGTERM into ``SIGTERMException`` after the running batch but
  saves nothing outside SLURM; this callback writes ``last.ckpt`` (resume with ``--ckpt_path last``). It also
  writes it at the end of a finished fit when no ModelCheckpoint saved the final step: Lightning 2.6 refreshes
  ``save_last`` only when a checkpoint is saved, so a monitored best-checkpoint callback leaves ``last.ckpt`` at
  the last improvement.
* :class:`SkipReport`: counts samples dropped under ``data.on_error: skip`` (pre-flight and at load time), prints
  them at the end of each epoch and in a final summary.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from idrecog.errors import ConfigError, IdrecogError

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteLossError",
    "PreemptionCheckpoint",
    "SkipReport",
    "atomic_torch_save",
]


class NonFiniteLossError(IdrecogError):
    """Training stopped: the loss was NaN or inf for too many consecutive steps."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # the rename itself must reach the disk for the new name to survive a power cut
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (remote URLs keep Lightning's own path)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        fs = get_filesystem(path)
        fs.makedirs(os.path.dirname(str(path)), exist_ok=True)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        # resuming reads a file the user pointed at: no arbitrary code from it (plain tensors and containers)
        if not get_filesystem(path).exists(str(path)):
            raise ConfigError(f"checkpoint not found: {path}")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(
                f"{path}: refused to load: the file needs arbitrary code to unpickle (weights_only=True): "
                + str(e).splitlines()[0]
            ) from None


class PreemptionCheckpoint(Callback):
    """Keep ``last.ckpt`` (in the ModelCheckpoint's folder) the latest state: save it on SIGTERM (Lightning's
    ``SIGTERMException``), and at the end of a finished fit when a ModelCheckpoint keeps a ``last`` file but saved
    none at the final step (its ``save_last`` follows its saves: with ``monitor``, the last improvement).

    Args:
        dirpath: where to write; None: the first ModelCheckpoint's ``dirpath``, else
            ``{default_root_dir}/checkpoints``.
        filename: the file name (contains ``last`` so that ``--ckpt_path last`` finds it).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        self.dirpath = dirpath
        self.filename = filename
        #: the path written by the last preemption (None before)
        self.saved_path: str | None = None

    def _dir(self, trainer: L.Trainer) -> str:
        if self.dirpath:
            return self.dirpath
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return str(cb.dirpath)
        return os.path.join(trainer.default_root_dir, "checkpoints")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.global_step == 0:
            return
        keepers = [
            cb
            for cb in trainer.callbacks
            if isinstance(cb, ModelCheckpoint) and cb.save_last  # type: ignore[attr-defined]
        ]
        # Lightning's own record of each callback's latest save (no public accessor)
        if not keepers or any(
            getattr(cb, "_last_global_step_saved", None) == trainer.global_step and cb.last_model_path
            for cb in keepers
        ):
            return
        path = os.path.join(self._dir(trainer), self.filename)
        trainer.save_checkpoint(path)
        for cb in keepers:  # so `--ckpt_path last` and the callbacks' state name this file
            cb.last_model_path = path
        rank_zero_info(f"[checkpoint] saved {path} at the final step {trainer.global_step}")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = os.path.join(self._dir(trainer), self.filename)
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(
            f"[preempted] SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last"
        )


class SkipReport(Callback):
    """Counts the samples dropped under ``data.on_error: skip`` and reports them.

    Pre-flight drops (``preflight``: {split: {reason: n}}) are known before training; load-time drops arrive in
    the batches (``batch["skipped"]``: {reason: n}, counted in the main process, so right with any
    ``num_workers``). Printed at the end of every epoch that dropped something, and summarised at the end of fit.
    """

    def __init__(self, preflight: dict[str, dict[str, int]] | None = None) -> None:
        self.preflight = {k: dict(v) for k, v in (preflight or {}).items()}
        self._epoch: dict[str, Counter[str]] = {}
        #: load-time drops over the whole run, per stage
        self.total: dict[str, Counter[str]] = {}
        #: the last epoch's report per stage (pre-flight + load time): {reason: n}
        self.last: dict[str, dict[str, int]] = {}

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
