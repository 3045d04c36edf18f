"""Training-time safety net: a checkpoint on SIGTERM (atomic checkpoint writes:
:class:`idrecog.utils.checkpoint.AtomicCheckpointIO`).

* :class:`PreemptionCheckpoint`: Lightning turns SIGTERM into ``SIGTERMException`` after the running batch but
  saves nothing outside SLURM; this callback writes ``last.ckpt`` (resume with ``--ckpt_path last``). It also
  writes it at the end of a finished fit when no ModelCheckpoint saved the final step: Lightning 2.6 refreshes
  ``save_last`` only when a checkpoint is saved, so a monitored best-checkpoint callback leaves ``last.ckpt`` at
  the last improvement.
"""

from __future__ import annotations

import logging
import os

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)

__all__ = ["PreemptionCheckpoint"]


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
