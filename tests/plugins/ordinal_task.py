"""An example task type that lives OUTSIDE the idrecog package: ordered classes with a cumulative-logit head.

Importing this module registers ``type: ordinal``; a catalogue may also name the class by import path,
``type: tests.plugins.ordinal_task:Ordinal``, and idrecog imports it on first use. Nothing inside idrecog
changes to add it. ``docs/task-types.md`` walks through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from idrecog.tasks import CLASS, NUMBER, HeadContext, TaskType, register_task_type
from idrecog.tasks.catalogue import TaskSpec


class OrdinalHead(nn.Module):
    """One score per sample and K - 1 learned thresholds (CORAL): logit_k = score + bias_k models P(y > k).

    task_feats: [B, 1, D] -> {"logits": [B, K - 1]} cumulative logits.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1, bias=False)
        # spread initial thresholds so that every class starts reachable
        self.bias = nn.Parameter(torch.linspace(1.0, -1.0, num_classes - 1))

    def forward(self, task_feats: Tensor, ctx: HeadContext | None = None) -> dict[str, Tensor]:
        return {"logits": self.score(self.norm(task_feats[:, 0])) + self.bias}


@register_task_type
class Ordinal(TaskType):
    """Ordered classes (e.g. wear: new < worn < damaged), ``classes`` listed from lowest to highest."""

    type_name = "ordinal"
    label_format = "a class name from the task's ordered `classes` (lowest first)"
    target_format = "LongTensor [B] of class ranks, -1 where absent"
    output_format = "logits [B, K - 1]: cumulative logits of P(y > k)"
    primary_metric = "mae"
    higher_is_better = False

    @classmethod
    def validate_spec(cls, spec: TaskSpec) -> None:
        if not spec.classes or len(spec.classes) < 3:
            raise ValueError("an ordinal task needs at least 3 ordered 'classes'")

    def check_label(self, value: Any) -> None:
        if not isinstance(value, str) or value not in (self.spec.classes or ()):
            raise ValueError(f"{value!r} is not one of the classes {list(self.spec.classes or ())}")

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> int:
        return self.spec.class_index(value)

    def collate(self, targets: list[Any | None], image_size: tuple[int, int]) -> Tensor:
        return torch.tensor([-1 if t is None else int(t) for t in targets], dtype=torch.long)

    def build_head(self, dim: int) -> nn.Module:
        return OrdinalHead(dim, self.spec.num_classes)

    def loss(self, outputs: dict[str, Tensor], targets: Tensor, present: Tensor) -> Tensor:
        idx = self.present_index(present)
        if idx.numel() == 0:
            return self.zero_loss(outputs)
        logits = outputs["logits"][idx].float()
        ranks = torch.arange(logits.shape[1], device=logits.device)
        above = (targets.to(logits.device)[idx, None] > ranks).float()  # [P, K - 1]: y > k
        return F.binary_cross_entropy_with_logits(logits, above)

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """logits: [B, K - 1] -> [B, K]: P(y = k) from the cumulative P(y > k), clamped where not monotone."""
        p_above = logits.float().sigmoid()
        ones, zeros = p_above.new_ones(len(p_above), 1), p_above.new_zeros(len(p_above), 1)
        cum = torch.cat([ones, p_above, zeros], 1)  # P(y > k - 1) for k = 0..K
        return (cum[:, :-1] - cum[:, 1:]).clamp(min=0)

    def predict(self, logits: Tensor) -> Tensor:
        """The rank: how many thresholds the sample passes."""
        return (logits > 0).sum(1)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "mae": MeanAbsoluteError(),
                "accuracy": MulticlassAccuracy(self.spec.num_classes, average="micro"),
            }
        )

    def update_metrics(
        self, metrics: MetricCollection, outputs: dict[str, Tensor], targets: Tensor, present: Tensor
    ) -> None:
        idx = self.present_index(present)
        if idx.numel():
            pred = self.predict(outputs["logits"][idx].detach())
            tgt = targets.to(pred.device)[idx]
            metrics["mae"].update(pred.float(), tgt.float())
            metrics["accuracy"].update(pred, tgt)

    def postprocess(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        logits = outputs["logits"].detach().cpu()
        names = self.spec.classes or ()
        return [
            {"class": names[int(r)], "probabilities": {n: float(v) for n, v in zip(names, p, strict=True)}}
            for r, p in zip(self.predict(logits), self.class_probabilities(logits), strict=True)
        ]

    # decision rules may test the predicted class (a name) or its rank (a number): `wear rank <= 1`
    @classmethod
    def rule_fields(cls, spec: TaskSpec) -> dict[str, str]:
        return {"class": CLASS, "rank": NUMBER}

    @classmethod
    def rule_value(cls, spec: TaskSpec, output: Mapping[str, Any], field: str) -> Any:
        if field == "rank":
            return list(spec.classes or ()).index(output["class"])
        return output[field]

    @classmethod
    def example_spec(cls) -> TaskSpec:
        return TaskSpec(
            name="example_ordinal",
            type=cls.type_name,
            query_text="How worn is the document?",
            classes=("new", "worn", "damaged", "destroyed"),
        )

    @classmethod
    def example_label(cls, spec: TaskSpec, root: Path, image_size: tuple[int, int], seed: int = 0) -> str:
        classes = spec.classes or ()
        return classes[seed % len(classes)]

    def output_shapes(self, batch_size: int, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        return {"logits": (batch_size, self.spec.num_classes - 1)}
