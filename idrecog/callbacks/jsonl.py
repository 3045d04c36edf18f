"""``JsonlWriter``: ``idrecog predict`` for modules whose ``predict_step`` returns JSON-able objects.

Each object of each batch's list becomes one line of ``output_dir/predictions.jsonl``. The task classifier's
config uses it (one ``{"id", "doc_type", "probs", "tasks"}`` per image); the unified model's writer
(:class:`idrecog.callbacks.prediction_writer.JsonlPredictionWriter`) subclasses it to write recognition records, masks and
overlays.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class JsonlWriter(BasePredictionWriter):
    """Writes ``output_dir/predictions.jsonl`` (``predictions.rank<r>.jsonl`` on more than one device), one line
    per object that ``predict_step`` returns, flushed after every batch. Subclasses turn a batch's prediction into
    other objects by overriding :meth:`records`.

    Args:
        output_dir: folder for the file (created).
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.path: Path | None = None
        self.count = 0
        self._file: IO[str] | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = (
            "predictions.jsonl" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.jsonl"
        )
        self.path = self.output_dir / name
        self._file = self.path.open("w")
        self.count = 0

    def records(self, prediction: Any, batch: Any) -> Iterable[Any]:
        """The JSON-able objects of one batch (default: ``predict_step``'s list as it is)."""
        return prediction if isinstance(prediction, list) else [prediction]

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self._file is not None
        for obj in self.records(prediction, batch):
            self._file.write(json.dumps(obj) + "\n")
            self.count += 1
        self._file.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        print(f"[idrecog] wrote {self.count} predictions to {self.path}")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._close()  # what was written stays readable
