"""Detection: N object queries, each a class (or no-object) and a box; DETR set loss with Hungarian matching."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors

from idrecog.data.catalogue import TaskSpec
from idrecog.tasks.base import TaskType
from idrecog.tasks.registry import register_task_type


@register_task_type
class Detection(TaskType):
    type_name = "detection"
    label_format = "list of {box: [x1, y1, x2, y2] in image pixels, label: class name} (may be empty)"
    target_format = "list (length B) of {boxes: FloatTensor [n, 4] xyxy pixels, labels: LongTensor [n]}, None where absent"
    primary_metric = "map_50"

    @classmethod
    def validate_spec(cls, spec: TaskSpec) -> None:
        if not spec.classes:
            raise ValueError("a detection task needs 'classes'")

    @property
    def num_queries(self) -> int:
        return int(self.options.get("num_queries", 16))

    def check_label(self, value: Any) -> None:
        if not isinstance(value, list):
            raise ValueError(f"must be a list of {{box, label}} objects, got {type(value).__name__}")
        for j, obj in enumerate(value):
            if not isinstance(obj, dict) or set(obj) != {"box", "label"}:
                raise ValueError(f"[{j}] must be an object with exactly the keys 'box' and 'label'")
            if obj["label"] not in (self.spec.classes or ()):
                raise ValueError(f"[{j}].label {obj['label']!r} is not one of {list(self.spec.classes or ())}")
            b = obj["box"]
            if (
                not isinstance(b, list)
                or len(b) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in b)
            ):
                raise ValueError(f"[{j}].box must be 4 finite numbers [x1, y1, x2, y2], got {b!r}")
            if not (b[2] > b[0] and b[3] > b[1]):
                raise ValueError(f"[{j}].box {b!r} has non-positive width or height")

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> dict[str, Any]:
        h, w = image_size
        boxes = torch.tensor([o["box"] for o in value], dtype=torch.float32).reshape(-1, 4)
        if len(boxes) and ((boxes[:, :2] < 0).any() or (boxes[:, 2] > w).any() or (boxes[:, 3] > h).any()):
            raise ValueError(f"a box lies outside the image of size {w}x{h} (W x H)")
        labels = torch.tensor([self.spec.class_index(o["label"]) for o in value], dtype=torch.long)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": labels,
        }

    def collate(self, targets: list[Any | None]) -> list[dict[str, Tensor] | None]:
        out: list[dict[str, Tensor] | None] = []
        for t in targets:
            if t is None:
                out.append(None)
            else:
                boxes = t["boxes"].as_subclass(Tensor).float().reshape(-1, 4)
                out.append({"boxes": boxes, "labels": t["labels"].long()})
        return out
