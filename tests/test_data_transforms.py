"""Augmentation moves boxes, masks and frames with the image; sanitising drops boxes with their labels."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from idrecog.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SanitizeTaskBoxes,
    build_transforms,
    check_img_size,
    denormalize,
)
from idrecog.errors import ConfigError

H, W = 64, 96
BOX = (30, 20, 62, 44)  # x1, y1, x2, y2 of a white rectangle


def _sample() -> dict:
    img = torch.zeros(3, H, W, dtype=torch.uint8)
    x1, y1, x2, y2 = BOX
    img[:, y1:y2, x1:x2] = 255
    mask = torch.zeros(H, W, dtype=torch.long)
    mask[y1:y2, x1:x2] = 1
    # an angle frame of the same capture: the same rectangle, dimmer
    angle = tv_tensors.Image(img // 2)
    return {
        "image": tv_tensors.Image(img),
        "frames": {"flash": tv_tensors.Image(img.clone()), "angles": [angle, None]},
        "targets": {
            "fields": {
                "boxes": tv_tensors.BoundingBoxes(
                    torch.tensor([BOX], dtype=torch.float32), format="XYXY", canvas_size=(H, W)
                ),
                "labels": torch.tensor([3]),
            },
            "card_mask": tv_tensors.Mask(mask),
            "tampering": 1,
            "image_quality": None,
        },
    }


def _bbox_of(region: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(region, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_moves_box_mask_and_frames_with_the_image(seed: int) -> None:
    t = build_transforms("fit", (H, W), augment=True, normalize=False)
    torch.manual_seed(seed)
    out = t(_sample())
    img = out["image"]
    assert isinstance(img, tv_tensors.Image) and img.dtype == torch.float32
    white = img.min(0).values > 0.5  # the rectangle (colour jitter keeps it far brighter than the black)
    assert white.sum() > 100
    box = out["targets"]["fields"]["boxes"][0].tolist()
    wb = _bbox_of(white)
    # the box still covers the white pixels (1 px tolerance for interpolation) and hugs them
    assert box[0] <= wb[0] + 1 and box[1] <= wb[1] + 1 and box[2] >= wb[2] - 1 and box[3] >= wb[3] - 1
    assert _iou(box, wb) > 0.9  # an unmoved box scores 0.73-0.87 on these seeds
    assert out["targets"]["fields"]["labels"].tolist() == [3]
    mask = out["targets"]["card_mask"]
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.long
    inter = ((mask == 1) & white).sum().item()
    union = ((mask == 1) | white).sum().item()
    assert inter / union > 0.85
    assert set(mask.unique().tolist()) <= {0, 1, 255}
    # frames: the flash copy is transformed identically; the dimmer angle frame has its rectangle in the same place
    torch.testing.assert_close(out["frames"]["flash"], img)
    angle = out["frames"]["angles"][0]
    bright = angle.min(0).values > 0.25
    assert (bright & white).sum() / (bright | white).sum() > 0.85
    assert out["frames"]["angles"][1] is None
    assert out["targets"]["tampering"] == 1 and out["targets"]["image_quality"] is None


def test_eval_pipeline_is_deterministic_resize_and_normalise() -> None:
    t = build_transforms("test", (32, 48), augment=True)  # augment is ignored outside training
    s = _sample()
    a, b = t(s), t(_sample())
    torch.testing.assert_close(a["image"], b["image"])
    assert a["image"].shape == (3, 32, 48) and a["targets"]["card_mask"].shape == (32, 48)
    torch.testing.assert_close(a["targets"]["fields"]["boxes"][0], torch.tensor(BOX, dtype=torch.float32) / 2)
    # a black pixel normalises to -mean/std
    torch.testing.assert_close(a["image"][:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))
    torch.testing.assert_close(denormalize(a["image"])[:, 0, 0], torch.zeros(3), atol=1e-6, rtol=0)


def test_no_horizontal_flip_in_training_pipeline() -> None:
    names = [type(op).__name__ for op in build_transforms("fit", (H, W), augment=True).transforms]
    assert not any("Flip" in n for n in names)
    assert "RandomAffine" in names and "ColorJitter" in names


def test_sanitize_drops_degenerate_boxes_with_their_labels() -> None:
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[0, 0, 10, 10], [5, 5, 5.5, 20], [20, 20, 40, 30]], dtype=torch.float32),
        format="XYXY",
        canvas_size=(H, W),
    )
    # a semantic mask whose height equals the number of boxes must not be indexed by the sanitiser
    sample = {
        "targets": {
            "a": {"boxes": boxes, "labels": torch.tensor([1, 2, 3])},
            "b": None,
            "m": tv_tensors.Mask(torch.ones(3, W, dtype=torch.long)),
        }
    }
    out = SanitizeTaskBoxes()(sample)
    assert out["targets"]["a"]["labels"].tolist() == [1, 3]
    assert out["targets"]["a"]["boxes"].shape == (2, 4) and out["targets"]["m"].shape == (3, W)
    assert out["targets"]["b"] is None


def test_check_img_size() -> None:
    assert check_img_size((160, 256), 16) == (160, 256)
    with pytest.raises(ConfigError, match=r"data\.img_size.*multiple of the patch size 16"):
        check_img_size((150, 256), 16)
    with pytest.raises(ConfigError, match="two positive integers"):
        check_img_size((160,), 16)
