"""``JsonlPredictionWriter``: a Lightning prediction writer for ``idrecog predict`` (JSONL + optional overlays).

Each line is the same object ``idrecog recognize`` prints (see :func:`idrecog.recognition.recognizer.make_record`),
for the samples of the DataModule's predict split. Add it in a config::

    trainer:
      callbacks:
        - class_path: idrecog.callbacks.prediction_writer.JsonlPredictionWriter
          init_args: {output_dir: outputs/predict, write_overlays: true, rules: lightning_configs/rules/default.yaml}
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image

from idrecog.callbacks.jsonl import JsonlWriter
from idrecog.data.resolution import create_task_resolver
from idrecog.recognition.recognizer import make_record, safe_name
from idrecog.recognition.rules import RuleSet, load_rules
from idrecog.tasks.drawing import Canvas


class JsonlPredictionWriter(JsonlWriter):
    """Writes ``output_dir/predictions.jsonl`` (``predictions.rank<r>.jsonl`` on more than one device), masks as
    PNG under ``output_dir/masks`` and, with ``write_overlays``, ``output_dir/overlays/<id>.png``.

    Args:
        output_dir: folder for the outputs.
        write_overlays: draw masks and boxes over each input image.
        rules: a rule file for the recognition result (None: no decision).
        task_resolver: which tasks each record reports: ``doc_type_head`` (the doc type, given or predicted by
            the model's doc-type head), ``gate`` (the model's gate), or another resolver that resolves images.
    """

    def __init__(
        self,
        output_dir: str,
        write_overlays: bool = False,
        rules: str | None = None,
        task_resolver: str = "doc_type_head",
    ) -> None:
        super().__init__(output_dir)
        self.write_overlays = write_overlays
        self.rules_path = rules
        self.task_resolver = task_resolver
        self.rules: RuleSet | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self.catalogue = pl_module.catalogue
        self.rules = load_rules(self.rules_path, self.catalogue) if self.rules_path else None
        self.resolver = create_task_resolver(self.task_resolver, self.catalogue)
        self.task_types = pl_module.task_types

    def records(self, prediction: Any, batch: Any) -> Iterator[dict[str, Any]]:
        """Recognition records (as ``idrecog recognize`` prints them), each written before the next is built."""
        resolutions = self.resolver.resolve_batch(
            [p["doc_type"] for p in prediction],
            outputs=[p["outputs"] for p in prediction],
            routing=[p["routing"] for p in prediction],
        )
        for j, pred in enumerate(prediction):
            record = make_record(
                pred, self.catalogue, resolutions[j], rules=self.rules, out_dir=self.output_dir
            )
            if self.write_overlays:
                record["overlay"] = str(self._overlay(batch["image"][j], pred, record))
            yield record

    def _overlay(self, image: Any, pred: dict[str, Any], record: dict[str, Any]) -> Path:
        """The input image with each resolved task's output drawn by its task type and the decision."""
        from idrecog.data.transforms import denormalize

        rgb = (denormalize(image.detach().float().cpu()).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        canvas = Canvas(Image.fromarray(np.ascontiguousarray(rgb)), layer="prediction")
        decision = (record.get("recognition") or {}).get("decision")
        if decision:
            canvas.text(f"decision: {decision}")
        for task in record["outputs"]:
            self.task_types[task].draw_output(canvas, pred["outputs"][task])
        path = self.output_dir / "overlays" / f"{safe_name(str(record['id']))}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.render().save(path)
        return path
