"""MAE LightningModule, pretraining data, reconstruction pictures, and the encoder hand-off (checkpoint ->
ViTEncoder / timm / safetensors export)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch import Trainer
from PIL import Image, ImageDraw
from safetensors import safe_open

from idrecog.callbacks import MAEReconstructionImages
from idrecog.cli.pretrain import export_encoder, export_encoder_main
from idrecog.data.pretrain import PretrainDataModule, read_manifest_images
from idrecog.errors import ConfigError, DataFormatError
from idrecog.lit.mae import MAEPretrainModule, scaled_lr, warmup_cosine
from idrecog.models.encoder import ViTEncoder

IMG = (32, 48)
ENC = {"name": "vit_tiny_patch16_224", "img_size": IMG, "depth": 1}


def _draw_images(root: Path, n: int = 10) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = Image.new("RGB", (72, 45), (200, 180 + i, 150))
        ImageDraw.Draw(im).rectangle([5 + i, 5, 40, 30], outline=(20, 40, 200), width=3)
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"{i}.{'png' if i % 3 else 'jpg'}"
        im.save(p)
        out.append(p)
    (root / "notes.txt").write_text("not an image")
    return out


def _module(**kw) -> MAEPretrainModule:
    return MAEPretrainModule(
        ViTEncoder(**ENC), decoder_dim=32, decoder_depth=1, decoder_heads=2, warmup_steps=2, **kw
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A few real training steps with gradient accumulation; returns the module, trainer and checkpoint path."""
    root = tmp_path_factory.mktemp("mae")
    _draw_images(root / "imgs", n=20)  # 2 held out for validation (a tenth)
    torch.manual_seed(0)
    model = _module(base_lr=1e-2)
    before = {k: v.clone() for k, v in model.encoder.vit.state_dict().items()}
    dm = PretrainDataModule(
        source="folder", path=str(root / "imgs"), img_size=IMG, batch_size=3, val_samples=2
    )
    pictures = MAEReconstructionImages(every_n_steps=2, num_images=2)
    trainer = Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[pictures],
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    ckpt = root / "mae.ckpt"
    trainer.save_checkpoint(ckpt)
    return {
        "model": model,
        "trainer": trainer,
        "ckpt": ckpt,
        "root": root,
        "before": before,
        "pictures": pictures,
    }


def test_lr_follows_the_scaling_rule_with_accumulation(trained: dict) -> None:
    model, trainer = trained["model"], trained["trainer"]
    assert model.effective_batch_size() == 3 * 2 * 1
    assert model.lr == pytest.approx(1e-2 * 6 / 256)
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # the paper's ViT-B setting
    # per-step schedule: after 4 optimiser steps (2 warm-up) the cosine is at its end
    sched = trainer.lr_scheduler_configs[0]
    assert sched.interval == "step"
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_shape() -> None:
    assert warmup_cosine(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    vals = [warmup_cosine(s, 10, 100, 0.0) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(vals))


def test_training_changed_the_encoder_and_drew_pictures(trained: dict) -> None:
    after = trained["model"].encoder.vit.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in trained["before"].items())
    saved = trained["pictures"].saved
    names = [p.name for p in saved]
    assert "step_000002.png" in names and "step_000004.png" in names  # every 2 steps (and after validation)
    with Image.open(saved[0]) as im:
        assert im.width > 4 * IMG[1] and im.height > 2 * IMG[0]  # 2 rows x 4 columns


def test_checkpoint_loads_weights_only_and_rebuilds(trained: dict) -> None:
    ckpt = torch.load(trained["ckpt"], weights_only=True, map_location="cpu")
    hp = ckpt["hyper_parameters"]
    assert hp["encoder"]["class_path"] == "idrecog.models.encoder.ViTEncoder"
    assert hp["encoder"]["init_args"]["depth"] == 1 and list(hp["encoder"]["init_args"]["img_size"]) == list(
        IMG
    )
    again = MAEPretrainModule.load_from_checkpoint(trained["ckpt"], weights_only=True)
    for k, v in trained["model"].state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_pretrained_encoder_loads_into_unified_encoder(trained: dict, capsys: pytest.CaptureFixture) -> None:
    enc = ViTEncoder(**ENC, init_from=str(trained["ckpt"]))
    assert "missing none" in capsys.readouterr().out
    ref = trained["model"].encoder.vit.state_dict()
    for k, v in enc.vit.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # another input size: position embeddings are resampled from the 2 x 3 grid, the rest is unchanged
    big = ViTEncoder(name=ENC["name"], depth=1, img_size=(64, 80), init_from=str(trained["ckpt"]))
    out = capsys.readouterr().out
    assert "missing none" in out and "(2, 3) to (4, 5)" in out
    assert torch.equal(big.vit.blocks[0].attn.qkv.weight, ref["blocks.0.attn.qkv.weight"])


def test_export_safetensors_loads_in_plain_timm_and_viTencoder(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "encoder.safetensors"
    assert export_encoder_main(["--ckpt_path", str(trained["ckpt"]), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["timm_name"] == ENC["name"] and meta["img_size"] == "32,48" and meta["grid_size"] == "2,3"
    ref = trained["model"].encoder.vit.state_dict()
    # timm picks the safetensors loader from the file extension; load strictly (no missing keys)
    m = timm.create_model(
        ENC["name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out)),
        img_size=IMG,
        depth=1,
        num_classes=0,
    )
    assert set(m.state_dict()) == set(ref)  # no missing or extra keys (timm also loaded with strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k]), k
    enc = ViTEncoder(name=ENC["name"], depth=1, img_size=(48, 64), init_from=str(out))  # uses metadata grid
    assert enc.vit.pos_embed.shape[1] == 1 + 3 * 4
    with pytest.raises(ConfigError):
        export_encoder_main(["--ckpt_path", str(trained["ckpt"]), "--out", str(tmp_path / "x.pth")])


def test_export_refuses_a_checkpoint_without_encoder(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"head.weight": torch.zeros(2)}, "hyper_parameters": {"encoder": ENC}}, bad)
    with pytest.raises(ConfigError, match="lacks encoder weights"):
        export_encoder(bad, tmp_path / "e.safetensors")


def test_folder_datamodule_finds_images_recursively_and_splits(tmp_path: Path) -> None:
    files = _draw_images(tmp_path / "imgs", n=12)
    dm = PretrainDataModule(
        source="folder", path=str(tmp_path / "imgs"), img_size=IMG, batch_size=4, val_samples=5
    )
    dm.setup("fit")
    train, val = dm.train_dataset.files, dm.val_dataset.files  # type: ignore[union-attr]
    assert len(val) == 1 and len(train) == 11 and not set(train) & set(val)  # val capped at a tenth
    assert set(train) | set(val) == set(files)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, *IMG) and batch["image"].dtype == torch.float32
    assert batch["image"].min() < -0.5  # ImageNet-normalised, not in [0, 1]
    fixed = dm.fixed_images(1)
    assert torch.equal(fixed, dm.fixed_images(1))  # fixed: no random crop in validation


def test_manifest_source_reads_images_and_optional_frames(tmp_path: Path) -> None:
    _draw_images(tmp_path / "imgs", n=4)
    lines = [
        {"id": "a", "image": "imgs/b/c/0.jpg", "labels": {"anything": 1}, "assoc": {"flash": "imgs/a/1.png"}},
        {"id": "b", "image": "imgs/b/c/2.png", "labels": {}, "assoc": {"angles": ["imgs/a/3.png"]}},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert len(read_manifest_images(tmp_path / "train.jsonl")) == 2
    assert len(read_manifest_images(tmp_path / "train.jsonl", include_frames=True)) == 4
    dm = PretrainDataModule(source="manifest", path=str(tmp_path), img_size=IMG, batch_size=2)
    dm.setup()
    assert len(dm.train_dataset) == 2 and len(dm.val_dataset) == 1  # type: ignore[arg-type]
    (tmp_path / "bad.jsonl").write_text(
        json.dumps(lines[0]) + "\n" + json.dumps({"id": "c", "image": "../x.png"}) + "\n"
    )
    with pytest.raises(DataFormatError) as e:
        read_manifest_images(tmp_path / "bad.jsonl")
    assert e.value.line == 2 and e.value.field == "image"


def test_synthetic_source_is_deterministic_per_index() -> None:
    pytest.importorskip("idrecog.synth.generate")
    dm = PretrainDataModule(source="synthetic", img_size=(64, 96), num_samples=3, val_samples=2, batch_size=2)
    dm.setup()
    a = dm.val_dataset[1]["image"]  # type: ignore[index]
    dm2 = PretrainDataModule(
        source="synthetic", img_size=(64, 96), num_samples=3, val_samples=2, cache_synthetic=False
    )
    dm2.setup()
    assert torch.equal(a, dm2.val_dataset[1]["image"])  # type: ignore[index]
    assert not torch.equal(a, dm2.val_dataset[0]["image"])  # type: ignore[index]
    assert a.shape == (3, 64, 96) and math.isfinite(float(a.sum()))


def test_bad_data_config_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        PretrainDataModule(source="folder")
    with pytest.raises(ConfigError, match="no images"):
        PretrainDataModule(source="folder", path=str(tmp_path)).setup()


def test_public_timm_weights_start_pretraining(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a stand-in for a downloaded timm checkpoint: square 224 grid, 2 blocks, no metadata
    from safetensors.torch import save_file

    public = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=10)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in public.state_dict().items()}, str(path))
    enc = ViTEncoder(name="vit_tiny_patch16_224", img_size=IMG, depth=1, init_from=str(path))
    out = capsys.readouterr().out
    assert (
        "(14, 14) to (2, 3)" in out and "blocks.1." in out
    )  # resampled; the extra block reported as unexpected
    assert torch.equal(enc.vit.blocks[0].mlp.fc1.weight, public.blocks[0].mlp.fc1.weight)
    model = MAEPretrainModule(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    assert (
        model.hparams["encoder"]["init_args"]["init_from"] is None
    )  # weights travel in the checkpoint instead
