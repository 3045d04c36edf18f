"""Segmentation: K mask-embedding queries (one per class) dotted with pixel features, MaskFormer style.

Loss: per-pixel cross-entropy plus ``segmentation_models_pytorch`` Dice, both ignoring index 255, over the
present samples. Options: ``dice_weight`` (float, default 1.0).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segmentation_models_pytorch.losses import DiceLoss
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchvision import tv_tensors

from idrecog.tasks.base import NUMBER, HeadContext, TaskType
from idrecog.tasks.catalogue import TaskSpec
from idrecog.tasks.drawing import Canvas
from idrecog.tasks.registry import register_task_type

IGNORE_INDEX = 255


def mask_labels(logits: Tensor) -> Tensor:
    """logits: [B, K, H, W] -> per-pixel class index [B, H, W] (the first maximum, as ``argmax``).

    ``max(dim=1).indices`` rather than ``argmax(1)``: on CPU, argmax over the class dimension of an NCHW tensor
    takes a slow strided path (about 14x slower at 8 x 4 x 160 x 256), which dominated recognition's
    post-processing."""
    return logits.detach().max(dim=1).indices


class SegmentationHead(nn.Module):
    """MLP -> one mask embedding per class query, dotted with every pixel feature, upsampled to the input.

    task_feats: [B, K, D]; ctx.pixel_feats: [B, D, H/4, W/4] -> {"mask_logits": [B, K, H, W]}.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mask_embed = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim),
            nn.GELU(),
            nn.Linear(dim, dim),
            nn.GELU(),
            nn.Linear(dim, dim),
        )

    def forward(self, task_feats: Tensor, ctx: HeadContext) -> dict[str, Tensor]:
        if not ctx.has_pixel_features:
            raise ValueError("the segmentation head needs HeadContext.pixel_feats (build the pixel decoder)")
        logits = ctx.dot_pixels(self.mask_embed(task_feats))
        logits = F.interpolate(logits, size=tuple(ctx.image_size), mode="bilinear", align_corners=False)
        return {"mask_logits": logits}


@register_task_type
class Segmentation(TaskType):
    type_name = "segmentation"
    label_format = "path (relative to the dataset folder) of a PNG of class indices, 255 = ignore, same size as the image"
    target_format = "LongTensor [B, H, W] of class indices, 255 = ignore (all 255 where absent)"
    output_format = "mask_logits [B, K, H, W]"
    primary_metric = "miou"
    needs_pixel_features = True
    sampled_label_stats = True
    example_fields = {
        "query_text": "Segment the document and its machine-readable zone.",
        "classes": ("background", "document", "mrz"),
    }

    def __init__(self, spec: TaskSpec, **options: Any) -> None:
        super().__init__(spec, **options)
        self._dice = DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX, from_logits=True)

    @classmethod
    def validate_spec(cls, spec: TaskSpec) -> None:
        if not spec.classes or len(spec.classes) < 2:
            raise ValueError("a segmentation task needs 'classes' with at least 2 names (index 0 first)")
        if len(spec.classes) >= IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX - 1} classes (index {IGNORE_INDEX} means ignore)")

    def check_label(self, value: Any) -> None:
        if not isinstance(value, str) or not value.lower().endswith(".png"):
            raise ValueError(f"must be the relative path of a PNG mask, got {value!r}")

    def label_files(self, value: Any) -> list[str]:
        return [str(value)]

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> tv_tensors.Mask:
        path = root / value
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(
                    f"{path}: mask must be a single-channel PNG of class indices, got mode {im.mode}"
                )
            arr = np.asarray(im).astype(np.int64)
        if arr.shape != tuple(image_size):
            raise ValueError(
                f"{path}: mask size {arr.shape[::-1]} differs from the image size {tuple(image_size)[::-1]} (W, H)"
            )
        bad = (arr >= self.spec.num_classes) & (arr != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"{path}: class index {int(arr[bad][0])} >= number of classes {self.spec.num_classes}"
            )
        return tv_tensors.Mask(torch.from_numpy(arr))

    def collate(self, targets: list[Any | None], image_size: tuple[int, int]) -> Tensor:
        size = tuple(int(v) for v in image_size)
        out = torch.full((len(targets), *size), IGNORE_INDEX, dtype=torch.long)
        for i, t in enumerate(targets):
            if t is None:
                continue
            if tuple(t.shape) != size:
                raise ValueError(
                    f"a mask of size {tuple(t.shape)} in a batch of {size} images; resize it in the transform"
                )
            out[i] = t.as_subclass(Tensor).long()
        return out

    def new_label_stats(self) -> dict[str, Any]:
        return {"pixels": np.zeros(256, dtype=np.int64), "masks": 0}

    def add_label_stats(self, stats: dict[str, Any], value: Any, target: Any) -> dict[str, Any]:
        stats["pixels"] += np.bincount(target.as_subclass(Tensor).flatten().numpy(), minlength=256)[:256]
        stats["masks"] += 1
        return stats

    def format_label_stats(self, stats: dict[str, Any], labelled: int) -> str:
        pixels = stats["pixels"]
        if not stats["masks"]:
            return "-"
        total = pixels.sum() or 1
        parts = [f"{c}={pixels[i] / total:.1%}" for i, c in enumerate(self.spec.classes or ())]
        if pixels[IGNORE_INDEX]:
            parts.append(f"ignore={pixels[IGNORE_INDEX] / total:.1%}")
        return " ".join(parts) + f" ({stats['masks']} masks)"

    @classmethod
    def rule_fields(cls, spec: TaskSpec) -> dict[str, str]:
        return {f"area_fraction.{c}": NUMBER for c in spec.classes or ()}

    @classmethod
    def rule_value(cls, spec: TaskSpec, output: Mapping[str, Any], field: str) -> Any:
        head, _, tail = field.partition(".")
        return output[head][tail]

    def draw_target(self, canvas: Canvas, target: Any) -> None:
        canvas.mask(self.name, target.as_subclass(Tensor).cpu().numpy(), self.spec.classes or ())

    def draw_output(self, canvas: Canvas, output: Mapping[str, Any]) -> None:
        if output.get("mask") is not None and not isinstance(output["mask"], str):
            canvas.mask(self.name, np.asarray(output["mask"]), self.spec.classes or ())

    # ---------------------------------------------------------------- model side
    @property
    def num_queries(self) -> int:
        return self.spec.num_classes

    def build_head(self, dim: int) -> nn.Module:
        return SegmentationHead(dim)

    def loss(self, outputs: dict[str, Tensor], targets: Tensor, present: Tensor) -> Tensor:
        idx = self.present_index(present)
        if idx.numel() == 0:
            return self.zero_loss(outputs)
        logits = outputs["mask_logits"][idx].float()
        tgt = targets.to(logits.device)[idx]
        if tgt.shape[-2:] != logits.shape[-2:]:
            raise ValueError(
                f"mask targets of size {tuple(tgt.shape[-2:])} vs logits {tuple(logits.shape[-2:])}"
            )
        valid = (tgt != IGNORE_INDEX).flatten(1).sum(1)
        if not bool(valid.any()):
            return self.zero_loss(outputs)
        # per-sample mean over labelled pixels, then mean over the samples that have any
        ce = F.cross_entropy(logits, tgt, ignore_index=IGNORE_INDEX, reduction="none").flatten(1).sum(1)
        has = valid > 0
        ce = (ce[has] / valid[has]).mean()
        dice = self._dice(logits[has], tgt[has])
        return ce + float(self.options.get("dice_weight", 1.0)) * dice

    def build_metrics(self) -> MetricCollection:
        k = self.spec.num_classes
        return MetricCollection(
            {
                "miou": MulticlassJaccardIndex(num_classes=k, average="macro", ignore_index=IGNORE_INDEX),
                "pixel_accuracy": MulticlassAccuracy(
                    num_classes=k, average="micro", ignore_index=IGNORE_INDEX
                ),
            }
        )

    def update_metrics(
        self, metrics: MetricCollection, outputs: dict[str, Tensor], targets: Tensor, present: Tensor
    ) -> None:
        idx = self.present_index(present)
        if idx.numel():
            pred = mask_labels(outputs["mask_logits"][idx])
            metrics.update(pred, targets.to(pred.device)[idx])

    def postprocess(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        masks = mask_labels(outputs["mask_logits"]).to(torch.uint8).cpu().numpy()
        names = self.spec.classes or ()
        out = []
        for m in masks:
            counts = np.bincount(m.ravel(), minlength=len(names))
            out.append(
                {
                    "mask": m,
                    "area_fraction": {
                        n: round(float(c) / m.size, 6) for n, c in zip(names, counts, strict=True)
                    },
                }
            )
        return out

    # ---------------------------------------------------------------- self-description
    @classmethod
    def example_label(cls, spec: TaskSpec, root: Path, image_size: tuple[int, int], seed: int = 0) -> str:
        """Writes ``example_<seed>.png``: nested rectangles of classes 1.., class 0 around, an ignore border."""
        h, w = image_size
        arr = np.zeros((h, w), dtype=np.uint8)
        for k in range(1, spec.num_classes):
            m = (k + seed) % 3 + k
            arr[m * h // 16 : h - m * h // 16, (m + seed) * w // 16 : w - m * w // 16] = k
        arr[0, :] = IGNORE_INDEX
        rel = f"{spec.name}_{seed}.png"
        Image.fromarray(arr).save(Path(root) / rel)
        return rel

    def output_shapes(self, batch_size: int, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        return {"mask_logits": (batch_size, self.spec.num_classes, *image_size)}
