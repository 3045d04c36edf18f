"""Classification: one query token, logits over the task's classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idrecog.data.catalogue import TaskSpec
from idrecog.tasks.base import TaskType
from idrecog.tasks.registry import register_task_type


@register_task_type
class Classification(TaskType):
    type_name = "classification"
    label_format = "a class name from the task's `classes`"
    target_format = "LongTensor [B] of class indices, -1 where absent"
    primary_metric = "accuracy"

    @classmethod
    def validate_spec(cls, spec: TaskSpec) -> None:
        if not spec.classes or len(spec.classes) < 2:
            raise ValueError("a classification task needs 'classes' with at least 2 names")

    def check_label(self, value: Any) -> None:
        if not isinstance(value, str) or value not in (self.spec.classes or ()):
            raise ValueError(f"{value!r} is not one of the classes {list(self.spec.classes or ())}")

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> int:
        return self.spec.class_index(value)

    def collate(self, targets: list[Any | None]) -> Tensor:
        return torch.tensor([-1 if t is None else int(t) for t in targets], dtype=torch.long)
