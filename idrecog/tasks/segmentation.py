"""Segmentation: K mask-embedding queries (one per class) dotted with pixel features, MaskFormer style."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from idrecog.data.catalogue import TaskSpec
from idrecog.tasks.base import TaskType
from idrecog.tasks.registry import register_task_type

IGNORE_INDEX = 255


@register_task_type
class Segmentation(TaskType):
    type_name = "segmentation"
    label_format = "path (relative to the dataset folder) of a PNG of class indices, 255 = ignore, same size as the image"
    target_format = "LongTensor [B, H, W] of class indices, 255 = ignore (all 255 where absent)"
    primary_metric = "miou"
    needs_pixel_features = True

    @classmethod
    def validate_spec(cls, spec: TaskSpec) -> None:
        if not spec.classes or len(spec.classes) < 2:
            raise ValueError("a segmentation task needs 'classes' with at least 2 names (index 0 first)")
        if len(spec.classes) >= IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX - 1} classes (index {IGNORE_INDEX} means ignore)")

    def check_label(self, value: Any) -> None:
        if not isinstance(value, str) or not value.lower().endswith(".png"):
            raise ValueError(f"must be the relative path of a PNG mask, got {value!r}")

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> tv_tensors.Mask:
        path = root / value
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(f"{path}: mask must be a single-channel PNG of class indices, got mode {im.mode}")
            arr = np.asarray(im).astype(np.int64)
        if arr.shape != tuple(image_size):
            raise ValueError(f"{path}: mask size {arr.shape[::-1]} differs from the image size {tuple(image_size)[::-1]} (W, H)")
        bad = (arr >= self.spec.num_classes) & (arr != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"{path}: class index {int(arr[bad][0])} >= number of classes {self.spec.num_classes}")
        return tv_tensors.Mask(torch.from_numpy(arr))

    def collate(self, targets: list[Any | None]) -> Tensor:
        shapes = {tuple(t.shape) for t in targets if t is not None}
        if len(shapes) > 1:
            raise ValueError(f"masks of one batch differ in size: {sorted(shapes)}; resize them in the transform")
        if not shapes:
            raise ValueError("collate needs the image size when no mask is present; use collate_with_size")
        return self.collate_with_size(targets, shapes.pop())

    def collate_with_size(self, targets: list[Any | None], size: tuple[int, int]) -> Tensor:
        out = torch.full((len(targets), *size), IGNORE_INDEX, dtype=torch.long)
        for i, t in enumerate(targets):
            if t is not None:
                out[i] = t.as_subclass(Tensor).long()
        return out
