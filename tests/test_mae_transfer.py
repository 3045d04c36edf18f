"""benchmarks/mae_transfer.py: the on-device crop / jitter of the pretraining images and the report's verdict
(the script itself runs end to end with ``--smoke``, about 1.5 minutes on 2 cores: too long for the suite)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import benchmarks.mae_transfer as mt
from benchmarks.common import hms


def test_device_augment_identity_and_ranges() -> None:
    from idrecog.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (6, 3, 32, 48), dtype=torch.uint8, generator=g)
    norm = (u8.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    # the whole image at its own aspect, no jitter: the crop is the identity
    same = mt.DeviceAugmentedImages(u8, norm, 4, (1.0, 1.0), (1.5, 1.5), 0.0).augment(u8)
    assert torch.allclose(same, norm, atol=1e-4)
    # the pretraining ranges: same shape, finite, pixel values within the normalised [0, 1] range, not identity
    dm = mt.DeviceAugmentedImages(u8, norm, 4, (0.6, 1.0), (1.3, 1.9), 0.2)
    torch.manual_seed(0)
    out = dm.augment(u8)
    assert out.shape == norm.shape and torch.isfinite(out).all()
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (out >= lo.view(1, 3, 1, 1) - 1e-4).all() and (out <= hi.view(1, 3, 1, 1) + 1e-4).all()
    assert not torch.allclose(out, norm, atol=1e-2)
    # the loader yields indices; the batch hook gathers and augments them on the batch's device
    batch = next(iter(dm.train_dataloader()))
    assert batch["idx"].shape == (4,)
    assert dm.on_after_batch_transfer(batch, 0)["image"].shape == (4, 3, 32, 48)


def test_report_pairs_seeds_and_respects_metric_direction(tmp_path: Path) -> None:
    mt.STATE.update({"notes": [], "runs": [], "pretrain": None, "calibration": None, "setup": {}})
    mt.STATE["setup"]["tasks"] = [
        {"name": "doc_type", "metric": "accuracy", "higher_is_better": True},
        {"name": "image_quality", "metric": "mae", "higher_is_better": False},
    ]
    mt.STATE["finetune_steps"] = 10
    runs = [
        ("mae", 0, 0.8, 0.10, 0.70),
        ("scratch", 0, 0.6, 0.20, 0.60),
        ("mae", 1, 0.7, 0.15, 0.65),
        ("scratch", 1, 0.5, 0.10, 0.55),
        ("mae", 2, 0.9, 0.05, 0.90),  # unpaired: shown, not in the means
    ]
    for arm, seed, acc, err, score in runs:
        metrics = {"val/doc_type/accuracy": acc, "val/image_quality/mae": err, "val/score": score}
        mt.STATE["runs"].append({"arm": arm, "seed": seed, "metrics": metrics, "steps_done": 10})
    mt.STATE["runs"].append({"arm": "scratch", "seed": 2, "error": "skipped (time budget)"})
    summary = mt.summarise()
    assert summary["score"]["paired_seeds"] == [0, 1]
    assert summary["verdict"]["target_met"] is True
    assert summary["verdict"]["mae_minus_scratch"] == pytest.approx(0.1)
    text = mt.render(summary)
    row = next(ln for ln in text.splitlines() if ln.startswith("| image_quality |"))
    assert row.rstrip().endswith("| -0.0250 | MAE |")  # mean error 0.125 vs 0.15: lower is better
    row = next(ln for ln in text.splitlines() if ln.startswith("| doc_type |"))
    assert row.rstrip().endswith("| MAE |")
    assert "**target (MAE-initialised better on mean val/score at equal steps): met**" in text
    mt._REPORTED = False
    mt.report(tmp_path)
    assert (tmp_path / "results.json").is_file() and "val/score" in (tmp_path / "results.md").read_text()
    assert hms(150) == "00:00:02:30"
