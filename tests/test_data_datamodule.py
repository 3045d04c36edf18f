"""IdDataModule: configuration errors, loaders per stage, user encoder, what the model configures, masked-frame
report in a real Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from idrecog.callbacks.data_reports import MaskedLabelReport
from idrecog.data.datamodule import IdDataModule
from idrecog.errors import ConfigError
from idrecog.models.user import UserFeatureEncoder
from idrecog.tasks.catalogue import default_catalogue


def _dm(root: Path, **kw) -> IdDataModule:
    return IdDataModule(root=str(root), img_size=(64, 96), batch_size=4, **kw)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.img_size"):
        IdDataModule(root=str(tmp_path), img_size=(60, 96), patch_size=16)
    with pytest.raises(ConfigError, match=r"data\.on_error"):
        IdDataModule(root=str(tmp_path), on_error="ignore")
    dm = IdDataModule(root=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"data\.root.*does not exist"):
        _ = dm.catalogue
    with pytest.raises(ConfigError, match=r"data\.root"):
        dm.prepare_data()
    with pytest.raises(ConfigError, match=r"data\.root"):
        dm.setup("fit")
    # before the data exists, synthesize_if_missing gives the default catalogue (to build the model)
    dm = IdDataModule(root=str(tmp_path / "nope"), synthesize_if_missing=True)
    assert dm.catalogue.names == default_catalogue().names
    with pytest.raises(ConfigError, match=r"data\.task_resolver"):
        _ = _dm(tmp_path / "nope", synthesize_if_missing=True, task_resolver="nope").resolver


def test_loaders_per_stage(tiny_dataset: Path) -> None:
    dm = _dm(tiny_dataset, limit_train_samples=8, seed=3)
    assert dm.catalogue.source.endswith("tasks.yaml")
    dm.prepare_data()  # data present: nothing to do
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["val"]) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 96) and batch["present"].shape == (4, len(dm.catalogue))
    assert set(batch["targets"]) == set(dm.catalogue.names)
    vb = next(iter(dm.val_dataloader()))
    assert vb["ids"] == ["val_000", "val_001", "val_002", "val_003"]  # no shuffle outside training
    fitted = UserFeatureEncoder.from_state(dm.user_features())
    assert fitted.n_attr == 2 and dm.datasets["val"].user_encoder == fitted
    # the same seed picks the same subset
    dm2 = _dm(tiny_dataset, limit_train_samples=8, seed=3)
    dm2.setup("fit")
    assert [s.id for s in dm2.datasets["train"].samples] == [s.id for s in dm.datasets["train"].samples]
    # predict reads the test split by default, or the one asked for
    ids = [i for b in dm.predict_dataloader() for i in b["ids"]]
    assert ids == [f"test_{i:03d}" for i in range(6)]
    dm3 = _dm(tiny_dataset, predict_split="val")
    assert next(iter(dm3.predict_dataloader()))["ids"][0] == "val_000"
    # a configured encoder state (a checkpoint's) replaces the fitted one, before any dataset is built
    with pytest.raises(RuntimeError, match="before the datasets"):
        dm3.configure(user_features=dm.user_features())
    stored = {**dm.user_features(), "attributes": {"declared_nationality": ["XA"]}}
    dm4 = _dm(tiny_dataset)
    dm4.configure(user_features=stored)
    dm4.setup("validate")
    assert dm4.user_features() == UserFeatureEncoder.from_state(stored).state_dict()
    assert dm4.datasets["val"].user_encoder == UserFeatureEncoder.from_state(stored)


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch["image"].mean((2, 3))).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_frames_are_decoded_only_when_the_model_reads_them(tiny_dataset: Path) -> None:
    from idrecog.lit.unified import UnifiedModule
    from idrecog.models.multimodal import MultimodalQueries
    from tests.test_model_fakes import fake_catalogue, tiny_parts

    module = UnifiedModule(catalogue=fake_catalogue().to_dict(), **tiny_parts())  # learned queries
    needs = module.data_requirements()
    assert needs == {"load_frames": False, "user_features": None}
    dm = _dm(tiny_dataset)
    assert dm.frames_loaded  # until told otherwise
    dm.configure(**needs)
    dm.setup("fit")
    assert not dm.frames_loaded and not any(ds.load_frames for ds in dm.datasets.values())
    dm.setup("test")  # datasets set up later follow too
    assert not dm.datasets["test"].load_frames
    assert MultimodalQueries.consumes_frames
    forced = _dm(tiny_dataset, load_frames=True)  # an explicit setting wins over the model
    forced.configure(load_frames=False)
    forced.setup("fit")
    assert forced.frames_loaded and forced.datasets["train"].load_frames


def test_masked_frames_reported_at_epoch_end(tiny_dataset: Path) -> None:
    dm = _dm(tiny_dataset, augment=False)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[MaskedLabelReport(dm.catalogue)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(_Tiny(), datamodule=dm)
    reports = [c for c in trainer.callbacks if isinstance(c, MaskedLabelReport)]
    assert len(reports) == 1
    # train line 8 has a hologram label but no frames; the val split lacks none
    assert reports[0].last["train"] == {"hologram": 1}
    assert reports[0].last["val"] == {"hologram": 0}
    assert trainer.callback_metrics["data/train_frames_missing/hologram"] == 1


def test_prepare_data_synthesizes_a_dataset_that_passes_check(tmp_path: Path, capsys) -> None:
    from idrecog.data.check import check_dataset

    root = tmp_path / "synthetic"
    synth = {"train": 3, "val": 2, "test": 2, "height": 64, "width": 96, "progress": False}
    dm = _dm(root, synthesize_if_missing=True, synth=synth)
    dm.prepare_data()
    assert "generating the synthetic benchmark" in capsys.readouterr().out
    assert (root / "tasks.yaml").is_file() and dm.catalogue.source == str(root / "tasks.yaml")
    res = check_dataset(root)
    assert res.ok, [str(p) for p in res.problems]
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape[1:] == (3, 64, 96)
