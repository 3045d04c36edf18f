"""Image transforms (torchvision.transforms.v2) applied to one sample's image, frames, masks and boxes at once.

The dataset calls the transform once on a dict::

    {"image": Image, "frames": {"flash": Image | None, "angles": [Image | None, ...]},
     "targets": {task: Mask | {"boxes": BoundingBoxes, "labels": Tensor} | other}}

so every geometric transform draws its random parameters once and moves the image, the frames of the same
capture, the segmentation masks and the boxes together. Non-tensor leaves (None, ints, floats) pass through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from idrecog.tasks.segmentation import IGNORE_INDEX

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

TRAIN_STAGES = ("fit", "train")


def _labels_of(target: dict[str, Any]) -> torch.Tensor:
    # a module-level function, not a lambda: transforms must pickle for spawn-started DataLoader workers
    return target["labels"]


class SanitizeTaskBoxes(v2.Transform):
    """``v2.SanitizeBoundingBoxes`` on every detection target nested in the sample dict.

    The stock transform expects exactly one ``BoundingBoxes`` per input and would also index semantic masks
    whose first dimension happens to equal the number of boxes; here each detection target
    (``{"boxes": BoundingBoxes, "labels": Tensor}``) is sanitised on its own, dropping the matching labels.
    """

    def __init__(self, min_size: float = 1.0, min_area: float = 1.0) -> None:
        super().__init__()
        self.sanitize = v2.SanitizeBoundingBoxes(
            min_size=min_size, min_area=min_area, labels_getter=_labels_of
        )

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        return self._walk(sample)

    def _walk(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            if isinstance(obj.get("boxes"), tv_tensors.BoundingBoxes) and isinstance(
                obj.get("labels"), torch.Tensor
            ):
                out = self.sanitize({"boxes": obj["boxes"], "labels": obj["labels"]})
                return {**obj, **out}
            return {k: self._walk(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._walk(v) for v in obj)
        return obj


def check_img_size(img_size: Sequence[int], patch_size: int, field: str = "data.img_size") -> tuple[int, int]:
    """(H, W) as ints, each a positive multiple of ``patch_size``; ``ConfigError`` naming ``field`` otherwise."""
    from idrecog.errors import ConfigError

    if len(img_size) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in img_size
    ):
        raise ConfigError(f"{field} must be two positive integers (H, W), got {list(img_size)!r}")
    h, w = int(img_size[0]), int(img_size[1])
    if patch_size <= 0 or h % patch_size or w % patch_size:
        raise ConfigError(
            f"{field} {[h, w]} must be a multiple of the patch size {patch_size} "
            f"(e.g. {[max(1, round(h / patch_size)) * patch_size, max(1, round(w / patch_size)) * patch_size]})"
        )
    return h, w


def build_transforms(
    stage: str,
    img_size: tuple[int, int] = (160, 256),
    augment: bool = True,
    *,
    normalize: bool = True,
) -> v2.Compose:
    """The v2 pipeline of a stage: resize, train-time augmentation, box sanitising, float conversion, normalising.

    Args:
        stage: ``fit``/``train`` (augmented when ``augment``) or ``validate``/``val``/``test``/``predict``.
        img_size: (H, W) of the network input.
        augment: small geometric (affine, perspective) and photometric jitter at train time. No horizontal
            flip: documents are not mirror-symmetric (text, MRZ and portrait position give the side away).
        normalize: ImageNet mean/std normalisation (off for visualisation).

    Images come in as ``tv_tensors.Image`` uint8 [3, H0, W0] and leave as float32 [3, H, W].
    """
    h, w = int(img_size[0]), int(img_size[1])
    ops: list[v2.Transform] = [v2.Resize((h, w), antialias=True)]
    if augment and stage in TRAIN_STAGES:
        # outside the warped capture a mask pixel is unknown, not background: fill it with the ignore index
        fill = {tv_tensors.Mask: IGNORE_INDEX, "others": 0}
        ops += [
            v2.RandomAffine(
                degrees=4, translate=(0.04, 0.04), scale=(0.92, 1.06), shear=(-3, 3, -3, 3), fill=fill
            ),
            v2.RandomPerspective(distortion_scale=0.12, p=0.3, fill=fill),
            # no hue jitter: the RGB<->HSV round trip was ~30% of the item time, and hue carries signal
            # (hologram colour shift, document colours)
            v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.2),
        ]
    ops.append(SanitizeTaskBoxes())
    ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    if normalize:
        ops.append(v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
    return v2.Compose(ops)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation. images: [..., 3, H, W] -> same shape, roughly in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return images * std + mean
