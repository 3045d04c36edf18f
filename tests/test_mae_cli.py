"""``idrecog pretrain`` and ``idrecog export-encoder`` through the real command entry point, in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from idrecog.cli import main
from idrecog.cli.pretrain import default_config_path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model.encoder.img_size=[32,48]",
    "--model.encoder.depth=1",
    "--model.decoder_dim=32",
    "--model.decoder_depth=1",
    "--model.decoder_heads=2",
    "--data.img_size=[32,48]",
    "--data.batch_size=2",
    "--data.num_workers=0",
    "--data.persistent_workers=false",
]


@pytest.fixture
def image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the default config writes under ./runs/pretrain
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        im = Image.new("RGB", (80, 50), (230, 220, 200))
        ImageDraw.Draw(im).text((5, 5 + i), f"ID {i}", fill=(0, 0, 0))
        im.save(root / f"{i}.png")
    return root


def test_packaged_default_config_pretrains_the_default_encoder() -> None:
    packaged = default_config_path()
    assert packaged.is_file()
    cfg = yaml.safe_load(packaged.read_text())
    unified = yaml.safe_load((REPO / "lightning_configs" / "unified.yaml").read_text())
    enc = cfg["model"]["encoder"]["init_args"]
    uenc = unified["model"]["init_args"]["encoder"]["init_args"]
    for key in ("name", "img_size", "depth"):  # the same encoder, so the weights hand over unchanged
        assert enc[key] == uenc[key], key
    assert cfg["data"]["img_size"] == enc["img_size"]


def test_pretrain_fast_dev_run_ends_cleanly(image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "pretrain",
            "--data.source=folder",
            f"--data.path={image_folder}",
            *TINY,
            "--trainer.fast_dev_run=true",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "MAE lr = base_lr 0.00015 x effective batch 2 / 256" in out
    assert list(Path("runs/pretrain").rglob("step_*.png"))  # the reconstruction picture after validation


def test_pretrain_print_config_uses_the_default_config(
    image_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["pretrain", "--print_config", "--model.mask_ratio=0.6"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["mask_ratio"] == 0.6
    assert cfg["model"]["encoder"]["init_args"]["name"] == "vit_tiny_patch16_224"
    assert cfg["trainer"]["max_steps"] > 0


def test_pretrain_rejects_mismatched_image_sizes(image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "pretrain",
        "--data.source=folder",
        f"--data.path={image_folder}",
        *TINY,
        "--data.img_size=[48,48]",
    ]
    assert main([*args, "--trainer.fast_dev_run=true"]) == 2
    assert "differs from the encoder's img_size" in capsys.readouterr().err


def test_pretrain_then_export_then_timm(image_folder: Path, tmp_path: Path) -> None:
    import timm

    args = ["pretrain", "--data.source=folder", f"--data.path={image_folder}", *TINY, "--trainer.max_steps=1"]
    assert main([*args, "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1"]) == 0
    ckpt = Path("runs/pretrain/checkpoints/last.ckpt")
    assert ckpt.is_file()
    out = tmp_path / "enc.safetensors"
    assert main(["export-encoder", "--ckpt_path", str(ckpt), "--out", str(out)]) == 0
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out)),
        img_size=(32, 48),
        depth=1,
        num_classes=0,
    )
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(m.pos_embed, state["model.encoder.vit.pos_embed"])
    assert main(["export-encoder", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(out)]) == 2
