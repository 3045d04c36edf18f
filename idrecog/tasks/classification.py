"""Classification: one query token, logits over the task's classes.

Options: ``label_smoothing`` (float, default 0) for the cross-entropy; ``class_weights``, the cross-entropy's
per-class weights, for imbalanced tasks scored by macro F1: one positive number per class, in the order of
``classes`` (e.g. ``[1, 3, 3]`` for classes drawn 60 / 20 / 20 %), or ``auto``: the "balanced" weights of the
training split's label counts (:func:`balanced_class_weights`), settled before training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from idrecog.errors import ConfigError
from idrecog.tasks.base import CLASS, NUMBER, HeadContext, TaskType
from idrecog.tasks.catalogue import TaskSpec
from idrecog.tasks.drawing import Canvas
from idrecog.tasks.metrics import APCER, BPCER
from idrecog.tasks.registry import register_task_type


def balanced_class_weights(counts: Sequence[int]) -> list[float]:
    """Inverse-frequency class weights, scikit-learn's "balanced": ``w_c = n / (C * n_c)``, n the labelled samples,
    C the classes, n_c those of class c. Balanced classes all get 1; the weights' mean over the labelled samples
    is 1, so the loss keeps its scale. A class with no sample counts as one (the rarest possible); no labels at
    all give all 1."""
    n, c = sum(int(k) for k in counts), len(counts)
    if n == 0:
        return [1.0] * c
    return [round(n / (c * max(int(k), 1)), 6) for k in counts]


class ClassificationHead(nn.Module):
    """LayerNorm + Linear on the task's query token.

    task_feats: [B, 1, D] -> {"logits": [B, C]}.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, task_feats: Tensor, ctx: HeadContext | None = None) -> dict[str, Tensor]:
        return {"logits": self.fc(self.norm(task_feats[:, 0]))}


@register_task_type
class Classification(TaskType):
    type_name = "classification"
    predicts_class = True
    label_format = "a class name from the task's `classes`"
    target_format = "LongTensor [B] of class indices, -1 where absent"
    output_format = "logits [B, C]"
    # macro-F1: a majority-class answer scores 1/C of it, not the majority's share as accuracy would
    primary_metric = "f1_macro"
    example_fields = {
        "query_text": "Has the document been tampered with?",
        "classes": ("genuine", "swap", "edit"),
    }

    def __init__(self, spec: TaskSpec, **options: Any) -> None:
        super().__init__(spec, **options)
        self.class_weights: Tensor | None = None
        w = options.get("class_weights")
        self._auto_weights = w == "auto"
        if w is not None and not self._auto_weights:
            ok = isinstance(w, list | tuple) and len(w) == spec.num_classes
            ok = ok and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in w
            )
            if not ok:
                raise ConfigError(
                    f"task {spec.name!r}: options.class_weights must be 'auto' or {spec.num_classes} positive "
                    f"numbers, one per class of {list(spec.classes or ())}, got {w!r}"
                )
            self.class_weights = torch.tensor([float(v) for v in w])
        bona_fide = options.get("bona_fide")
        if bona_fide is not None and bona_fide not in (spec.classes or ()):
            raise ConfigError(
                f"task {spec.name!r}: options.bona_fide must be one of its classes {list(spec.classes or ())}, "
                f"got {bona_fide!r}"
            )
        #: index of the bona fide (genuine) class: the task is an attack detector (APCER, BPCER, attack ROC-AUC)
        self.bona_fide: int | None = None if bona_fide is None else spec.class_index(bona_fide)
        self.operating_threshold = float(options.get("operating_threshold", 0.5))
        if not 0.0 < self.operating_threshold < 1.0:
            raise ConfigError(
                f"task {spec.name!r}: options.operating_threshold must be in (0, 1), got {self.operating_threshold!r}"
            )

    @classmethod
    def validate_spec(cls, spec: TaskSpec) -> None:
        if not spec.classes or len(spec.classes) < 2:
            raise ValueError("a classification task needs 'classes' with at least 2 names")

    def check_label(self, value: Any) -> None:
        if not isinstance(value, str) or value not in (self.spec.classes or ()):
            raise ValueError(f"{value!r} is not one of the classes {list(self.spec.classes or ())}")

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> int:
        return self.spec.class_index(value)

    def collate(self, targets: list[Any | None], image_size: tuple[int, int]) -> Tensor:
        return torch.tensor([-1 if t is None else int(t) for t in targets], dtype=torch.long)

    # ---------------------------------------------------------------- model side
    def build_head(self, dim: int) -> nn.Module:
        return ClassificationHead(dim, self.spec.num_classes)

    @property
    def needs_label_counts(self) -> bool:
        return self._auto_weights and self.class_weights is None

    def set_label_counts(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """``class_weights: auto`` from the training split's ``{class: samples}``: :func:`balanced_class_weights`."""
        classes = list(self.spec.classes or ())
        n = [int(counts.get(c, 0)) for c in classes]
        if not sum(n):
            warnings.warn(
                f"task {self.name!r}: class_weights auto: no labelled training sample, all weights 1",
                stacklevel=2,
            )
        weights = balanced_class_weights(n)
        self.class_weights = torch.tensor(weights)
        return {"class_weights": weights}

    def loss(self, outputs: dict[str, Tensor], targets: Tensor, present: Tensor) -> Tensor:
        if self.needs_label_counts:
            raise ConfigError(
                f"task {self.name!r}: options.class_weights is 'auto' but the training split's label counts were "
                "never given (UnifiedModule.setup takes them from IdDataModule.label_counts before training)"
            )
        idx = self.present_index(present)
        if idx.numel() == 0:
            return self.zero_loss(outputs)
        logits = outputs["logits"][idx].float()
        return F.cross_entropy(
            logits,
            targets.to(idx.device)[idx],
            weight=None if self.class_weights is None else self.class_weights.to(logits.device),
            label_smoothing=float(self.options.get("label_smoothing", 0.0)),
        )

    def build_metrics(self) -> MetricCollection:
        c = self.spec.num_classes
        metrics: dict[str, Any] = {
            "accuracy": MulticlassAccuracy(num_classes=c, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes=c, average="macro"),
            "auroc": MulticlassAUROC(num_classes=c),
        }
        if self.bona_fide is not None:
            # ISO/IEC 30107-3 at the operating threshold on the attack score 1 - P(bona fide)
            metrics["apcer"] = APCER(threshold=self.operating_threshold)
            metrics["bpcer"] = BPCER(threshold=self.operating_threshold)
            metrics["attack_auroc"] = BinaryAUROC()
        return MetricCollection(metrics, compute_groups=False)

    def update_metrics(
        self, metrics: MetricCollection, outputs: dict[str, Tensor], targets: Tensor, present: Tensor
    ) -> None:
        idx = self.present_index(present)
        if not idx.numel():
            return
        probs = outputs["logits"][idx].detach().float().softmax(-1)
        y = targets.to(idx.device)[idx]
        for name in ("accuracy", "f1_macro", "auroc"):
            metrics[name].update(probs, y)
        if self.bona_fide is not None:
            attack_score, is_attack = 1.0 - probs[:, self.bona_fide], (y != self.bona_fide).long()
            for name in ("apcer", "bpcer", "attack_auroc"):
                metrics[name].update(attack_score, is_attack)

    def postprocess(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        probs = outputs["logits"].detach().float().softmax(-1).cpu()
        names = self.spec.classes or ()
        return [
            {
                "class": names[int(p.argmax())],
                "probabilities": {n: round(float(v), 6) for n, v in zip(names, p, strict=True)},
            }
            for p in probs
        ]

    # ---------------------------------------------------------------- recognition and pictures
    @classmethod
    def rule_fields(cls, spec: TaskSpec) -> dict[str, str]:
        classes = list(spec.classes or ())
        return {"class": CLASS, "confidence": NUMBER, **{f"probabilities.{c}": NUMBER for c in classes}}

    @classmethod
    def rule_value(cls, spec: TaskSpec, output: Mapping[str, Any], field: str) -> Any:
        if field == "class":
            return output["class"]
        if field == "confidence":
            return output["confidence"] if "confidence" in output else max(output["probabilities"].values())
        return output["probabilities"][field.partition(".")[2]]

    def draw_output(self, canvas: Canvas, output: Mapping[str, Any]) -> None:
        p = output.get("probabilities", {}).get(output["class"])
        canvas.text(f"{self.name}: {output['class']}" + (f" ({p:.2f})" if p is not None else ""))

    # ---------------------------------------------------------------- self-description
    @classmethod
    def example_label(cls, spec: TaskSpec, root: Path, image_size: tuple[int, int], seed: int = 0) -> str:
        classes = spec.classes or ()
        return classes[seed % len(classes)]

    def output_shapes(self, batch_size: int, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        return {"logits": (batch_size, self.spec.num_classes)}
