"""Regression: one query token, one value; targets normalised to [0, 1] by the catalogue range.

The head predicts in normalised units (a sigmoid keeps it inside the range); metrics and ``postprocess``
report original units. Options: ``beta`` (float, default 0.1) of the smooth L1 loss, in normalised units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from idrecog.tasks.base import NUMBER, HeadContext, TaskType
from idrecog.tasks.catalogue import TaskSpec
from idrecog.tasks.drawing import Canvas
from idrecog.tasks.registry import register_task_type


class RegressionHead(nn.Module):
    """MLP on the task's query token, sigmoid output.

    task_feats: [B, 1, D] -> {"value": [B]} in [0, 1] (normalised units).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, task_feats: Tensor, ctx: HeadContext | None = None) -> dict[str, Tensor]:
        return {"value": self.mlp(task_feats[:, 0]).squeeze(-1).sigmoid()}


@register_task_type
class Regression(TaskType):
    type_name = "regression"
    label_format = "a finite number inside the task's `range`"
    target_format = "FloatTensor [B] normalised to [0, 1] by `range`, NaN where absent"
    output_format = "value [B] in [0, 1] (normalised units)"
    primary_metric = "mae"
    higher_is_better = False
    example_fields = {"query_text": "How tilted is the document, in degrees?", "range": (-2.0, 8.0)}

    @classmethod
    def validate_spec(cls, spec: TaskSpec) -> None:
        if spec.range is None:
            raise ValueError("a regression task needs 'range: [low, high]'")

    def check_label(self, value: Any) -> None:
        lo, hi = self.spec.range  # type: ignore[misc]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{value!r} is outside the range [{lo}, {hi}]")

    def normalise(self, value: float | Tensor) -> float | Tensor:
        lo, hi = self.spec.range  # type: ignore[misc]
        return (value - lo) / (hi - lo)

    def denormalise(self, value: float | Tensor) -> float | Tensor:
        lo, hi = self.spec.range  # type: ignore[misc]
        return value * (hi - lo) + lo

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> float:
        return float(self.normalise(float(value)))

    def collate(self, targets: list[Any | None], image_size: tuple[int, int]) -> Tensor:
        return torch.tensor([math.nan if t is None else float(t) for t in targets], dtype=torch.float32)

    # ---------------------------------------------------------------- model side
    def build_head(self, dim: int) -> nn.Module:
        return RegressionHead(dim)

    def loss(self, outputs: dict[str, Tensor], targets: Tensor, present: Tensor) -> Tensor:
        idx = self.present_index(present)
        if idx.numel() == 0:
            return self.zero_loss(outputs)
        pred = outputs["value"][idx].float()
        return F.smooth_l1_loss(pred, targets.to(pred.device)[idx], beta=float(self.options.get("beta", 0.1)))

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False)})

    def update_metrics(
        self, metrics: MetricCollection, outputs: dict[str, Tensor], targets: Tensor, present: Tensor
    ) -> None:
        idx = self.present_index(present)
        if idx.numel():
            pred = self.denormalise(outputs["value"][idx].detach().float())
            metrics.update(pred, self.denormalise(targets.to(idx.device)[idx].float()))

    def postprocess(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        values = self.denormalise(outputs["value"].detach().float().cpu())
        return [{"value": float(v)} for v in values]

    def new_label_stats(self) -> list[float]:
        return []

    def add_label_stats(self, stats: list[float], value: Any, target: Any) -> list[float]:
        stats.append(float(value))
        return stats

    def format_label_stats(self, stats: list[float], labelled: int) -> str:
        if not stats:
            return "-"
        v = np.asarray(stats)
        return f"range [{v.min():.3g}, {v.max():.3g}] mean {v.mean():.3g}"

    # ---------------------------------------------------------------- recognition and pictures
    @classmethod
    def rule_fields(cls, spec: TaskSpec) -> dict[str, str]:
        return {"value": NUMBER}

    @classmethod
    def rule_value(cls, spec: TaskSpec, output: Mapping[str, Any], field: str) -> Any:
        return output[field]

    def draw_target(self, canvas: Canvas, target: Any) -> None:
        value = float(self.denormalise(torch.as_tensor(float(target))))  # targets are in normalised units
        canvas.text(f"{self.name}={value:.3g}")

    # ---------------------------------------------------------------- self-description
    @classmethod
    def example_label(cls, spec: TaskSpec, root: Path, image_size: tuple[int, int], seed: int = 0) -> float:
        lo, hi = spec.range  # type: ignore[misc]
        return lo + (hi - lo) * ((seed * 0.37 + 0.1) % 1.0)

    def output_shapes(self, batch_size: int, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        return {"value": (batch_size,)}
