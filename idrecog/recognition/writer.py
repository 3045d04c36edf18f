"""``JsonlPredictionWriter``: a Lightning prediction writer for ``idrecog predict`` (JSONL + optional overlays).

Each line is the same object ``idrecog recognize`` prints (see :func:`idrecog.recognition.recognizer.make_record`),
for the samples of the DataModule's predict split. Add it in a config::

    trainer:
      callbacks:
        - class_path: idrecog.recognition.writer.JsonlPredictionWriter
          init_args: {output_dir: outputs/predict, write_overlays: true, rules: lightning_configs/rules/default.yaml}
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image, ImageDraw

from idrecog.callbacks.jsonl import JsonlWriter
from idrecog.recognition.recognizer import _routing, make_record, safe_name
from idrecog.recognition.rules import RuleSet, load_rules

# overlay colours per segmentation class index (index 0, background, stays transparent)
_PALETTE = np.array(
    [
        [0, 0, 0],
        [46, 204, 113],
        [231, 76, 60],
        [52, 152, 219],
        [241, 196, 15],
        [155, 89, 182],
        [26, 188, 156],
    ],
    dtype=np.uint8,
)


class JsonlPredictionWriter(JsonlWriter):
    """Writes ``output_dir/predictions.jsonl`` (``predictions.rank<r>.jsonl`` on more than one device), masks as
    PNG under ``output_dir/masks`` and, with ``write_overlays``, ``output_dir/overlays/<id>.png``.

    Args:
        output_dir: folder for the outputs.
        write_overlays: draw masks and boxes over each input image.
        rules: a rule file for the recognition result (None: no decision).
    """

    def __init__(self, output_dir: str, write_overlays: bool = False, rules: str | None = None) -> None:
        super().__init__(output_dir)
        self.write_overlays = write_overlays
        self.rules_path = rules
        self.rules: RuleSet | None = None
        self._captured: dict[str, Any] = {}
        self._hook: Any = None

    def _capture(self, module: Any, args: Any, output: dict[str, Any]) -> None:
        self._captured = output

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self.catalogue = pl_module.catalogue
        self.rules = load_rules(self.rules_path, self.catalogue) if self.rules_path else None
        self.doc_type_task = self.catalogue.doc_type_task
        # the gate's routing is not part of predict_step's result: read it from the same forward pass
        self._hook = pl_module.model.register_forward_hook(self._capture)
        self.type_names = list(pl_module.model.interpreter.type_names)

    def records(self, prediction: Any, batch: Any) -> Iterator[dict[str, Any]]:
        """Recognition records (as ``idrecog recognize`` prints them), each written before the next is built."""
        routing = _routing(self._captured, self.type_names, len(prediction))
        for j, pred in enumerate(prediction):
            masks = {
                t: o["mask"] for t, o in pred["outputs"].items() if isinstance(o.get("mask"), np.ndarray)
            }
            record = make_record(
                pred,
                self.catalogue,
                doc_type_task=self.doc_type_task,
                routing=routing[j],
                rules=self.rules,
                out_dir=self.output_dir,
            )
            if self.write_overlays:
                record["overlay"] = str(self._overlay(batch["image"][j], record, masks))
            yield record

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        super().on_predict_end(trainer, pl_module)

    def _overlay(self, image: Any, record: dict[str, Any], masks: dict[str, np.ndarray]) -> Path:
        from idrecog.data.transforms import denormalize

        rgb = (denormalize(image.detach().float().cpu()).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        canvas = rgb.astype(np.float32)
        for mask in masks.values():
            if mask.shape != rgb.shape[:2]:
                continue
            colours = _PALETTE[np.minimum(mask, len(_PALETTE) - 1)].astype(np.float32)
            on = (mask > 0)[..., None]
            canvas = np.where(on, 0.55 * canvas + 0.45 * colours, canvas)
        im = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for out in record["outputs"].values():
            for b in out.get("boxes", []):
                draw.rectangle(b["box"], outline=(255, 215, 0), width=1)
                draw.text((b["box"][0] + 1, b["box"][1] + 1), b["label"], fill=(255, 215, 0))
        decision = (record.get("recognition") or {}).get("decision")
        if decision:
            draw.text(
                (2, 2),
                decision,
                fill={"accept": (0, 200, 0), "review": (255, 165, 0)}.get(decision, (220, 0, 0)),
            )
        path = self.output_dir / "overlays" / f"{safe_name(str(record['id']))}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
        return path
