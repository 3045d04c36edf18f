"""``class_weights: auto``: "balanced" weights from the training split's label counts (as training reads the split:
the task resolver and masking applied), settled by the model before training, used by the loss, stored so
checkpoints rebuild with the numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from idrecog.data.datamodule import IdDataModule
from idrecog.errors import ConfigError
from idrecog.lit.unified import UnifiedModule, load_unified
from idrecog.models.decoder import TaskDecoder
from idrecog.models.encoder import ViTEncoder
from idrecog.tasks.catalogue import TaskSpec
from idrecog.tasks.classification import balanced_class_weights
from idrecog.tasks.registry import create_task_type
from tests.conftest import quiet_trainer

IMG = (32, 48)
CATALOGUE = {
    "tasks": [
        {"name": "kind", "type": "classification", "classes": ["common", "rare", "unseen"]},
        {"name": "side", "type": "classification", "classes": ["front", "back"]},
    ],
    # "kind" does not apply to pages: their "kind" labels are not trained on, and not counted
    "doc_types": {"card": ["kind", "side"], "page": ["side"]},
}
# (doc_type, kind, side) of the train split; kind on cards: 6 common, 2 rare, 0 unseen, 1 null
TRAIN = [("card", "common", "front")] * 6 + [("card", "rare", "back")] * 2 + [("card", None, "front")]
TRAIN += [("page", "rare", "back")] * 3


def _write_dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "tasks.yaml").write_text(yaml.safe_dump(CATALOGUE), encoding="utf-8")
    g = torch.Generator().manual_seed(0)
    for split, rows in (("train", TRAIN), ("val", TRAIN[:4] + TRAIN[6:8])):
        lines = []
        for i, (doc_type, kind, side) in enumerate(rows):
            sid = f"{split}-{i}"
            pixels = (torch.rand(IMG[0], IMG[1], 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "images" / f"{sid}.png")
            labels = {"kind": kind, "side": side}
            lines.append(
                json.dumps({"id": sid, "image": f"images/{sid}.png", "doc_type": doc_type, "labels": labels})
            )
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _dm(root: Path) -> IdDataModule:
    return IdDataModule(root=str(root), img_size=IMG, batch_size=4, augment=False, preflight_cache_dir="")


def _module(task_options: dict[str, Any]) -> UnifiedModule:
    torch.manual_seed(0)
    return UnifiedModule(
        catalogue=CATALOGUE,
        encoder=ViTEncoder("vit_tiny_patch16_224", img_size=IMG, depth=1, embed_dim=48, num_heads=2),
        decoder=TaskDecoder(dim=32, depth=1, num_heads=2),
        task_options=task_options,
        warmup_steps=1,
    )


def test_balanced_weights_are_inverse_frequency_with_mean_one() -> None:
    counts = [80, 12, 8]
    w = balanced_class_weights(counts)
    n, c = sum(counts), len(counts)
    for k, wk in zip(counts, w, strict=True):
        assert wk == pytest.approx(n / (c * k))
    # the labelled samples' mean weight is 1 (the loss keeps its scale); rarer classes weigh more
    assert sum(k * wk for k, wk in zip(counts, w, strict=True)) / n == pytest.approx(1.0)
    assert w[0] < w[1] < w[2]
    assert balanced_class_weights([5, 5]) == [1.0, 1.0]
    # a class without a sample counts as one
    assert balanced_class_weights([4, 0]) == [pytest.approx(4 / (2 * 4)), pytest.approx(4 / 2)]
    assert balanced_class_weights([0, 0]) == [1.0, 1.0]


def test_auto_weights_wait_for_the_counts_then_weight_the_loss() -> None:
    spec = TaskSpec(name="kind", type="classification", classes=("a", "b", "c"))
    tt = create_task_type(spec, class_weights="auto")
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    targets, present = torch.tensor([0, 0, 1, 2, 0]), torch.ones(5, dtype=torch.bool)
    assert tt.needs_label_counts
    with pytest.raises(ConfigError, match="label counts"):
        tt.loss({"logits": logits}, targets, present)
    settled = tt.set_label_counts({"a": 30, "b": 6, "c": 4})
    assert settled == {"class_weights": balanced_class_weights([30, 6, 4])}
    assert not tt.needs_label_counts
    expected = F.cross_entropy(logits, targets, weight=torch.tensor(settled["class_weights"]))
    torch.testing.assert_close(tt.loss({"logits": logits}, targets, present), expected)
    assert not torch.allclose(expected, F.cross_entropy(logits, targets))


def test_label_counts_follow_the_resolver_and_the_nulls(tmp_path: Path) -> None:
    dm = _dm(_write_dataset(tmp_path / "data"))
    counts = dm.label_counts()  # before setup: the split is resolved, not kept
    assert not dm.datasets
    assert counts == {"kind": {"common": 6, "rare": 2, "unseen": 0}, "side": {"front": 7, "back": 5}}
    dm.setup("fit")
    assert dm.label_counts() == counts  # from the set-up train dataset
    limited = IdDataModule(
        root=str(tmp_path / "data"), img_size=IMG, limit_train_samples=4, seed=0, preflight_cache_dir=""
    )
    assert sum(limited.label_counts()["side"].values()) == 4  # the subset training reads, not the file


def test_fit_settles_auto_weights_before_training_and_checkpoints_keep_them(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "data")
    model = _module({"classification": {"class_weights": "auto"}})
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=_dm(root))
    kind = balanced_class_weights([6, 2, 0])
    side = balanced_class_weights([7, 5])
    assert model.task_types["kind"].class_weights.tolist() == pytest.approx(kind)
    assert model.task_types["side"].class_weights.tolist() == pytest.approx(side)
    stored = model.hparams["task_options"]
    assert stored["kind"]["class_weights"] == kind and stored["side"]["class_weights"] == side
    assert stored["classification"]["class_weights"] == "auto"  # the request stays; the names' numbers win

    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    rebuilt = load_unified(ckpt)
    assert not rebuilt.task_types["kind"].needs_label_counts
    assert rebuilt.task_types["kind"].class_weights.tolist() == pytest.approx(kind)

    # a module built from the config (auto) takes the checkpoint's numbers, not the data's, when it loads it
    fresh = _module({"classification": {"class_weights": "auto"}})
    fresh.set_label_counts({"kind": {"common": 1, "rare": 1, "unseen": 1}, "side": {"front": 1, "back": 1}})
    assert fresh.task_types["kind"].class_weights.tolist() == [1.0, 1.0, 1.0]
    fresh.on_load_checkpoint(torch.load(ckpt, weights_only=True))
    assert fresh.task_types["kind"].class_weights.tolist() == pytest.approx(kind)
    assert fresh.hparams["task_options"]["side"]["class_weights"] == side


def test_fit_without_label_counts_is_a_config_error(tmp_path: Path) -> None:
    class NoCounts(L.LightningDataModule):
        def train_dataloader(self) -> Any:
            return []

    model = _module({"kind": {"class_weights": "auto"}})
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False)
    with pytest.raises(ConfigError, match="label_counts"):
        trainer.fit(model, datamodule=NoCounts())
