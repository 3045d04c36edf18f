"""Regression: one query token, one value; targets normalised to [0, 1] by the catalogue range."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idrecog.data.catalogue import TaskSpec
from idrecog.tasks.base import TaskType
from idrecog.tasks.registry import register_task_type


@register_task_type
class Regression(TaskType):
    type_name = "regression"
    label_format = "a finite number inside the task's `range`"
    target_format = "FloatTensor [B] normalised to [0, 1] by `range`, NaN where absent"
    primary_metric = "mae"
    higher_is_better = False

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

    def collate(self, targets: list[Any | None]) -> Tensor:
        return torch.tensor([math.nan if t is None else float(t) for t in targets], dtype=torch.float32)
