"""``idrecog pretrain`` and ``idrecog export-encoder`` through the real command entry point, in-process."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from idrecog.cli import main
from idrecog.cli.pretrain import default_config_path
from tests.test_reliability_train import _Evil

REPO = Path(__file__).resolve().parents[1]
TINY = [  # the encoder's img_size follows data.img_size (`${data.img_size}` in the config)
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
    assert cfg["data"]["img_size"] == unified["data"]["img_size"]
    assert enc["img_size"] == "${data.img_size}"  # both encoders take the size of their data


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
        "--model.encoder.img_size=[32,48]",
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


class RecordStart(L.Callback):
    """Writes the step training starts from to ``{default_root_dir}/start_step.txt``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(trainer.default_root_dir, "start_step.txt").write_text(str(trainer.global_step))


def test_pretrain_sigterm_saves_then_resumes_from_last(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """fit's reliability, shared: SIGTERM saves last.ckpt in the run folder and exits 143; ``--ckpt_path`` (a file
    or ``last``) resumes from it, read with weights_only=True; a file that needs code to unpickle is refused."""
    run = tmp_path / "mae_run"
    args = [
        "pretrain",
        "--data.source=folder",
        f"--data.path={image_folder}",
        *TINY,
        f"--trainer.default_root_dir={run}",
        "--trainer.limit_val_batches=0",
        "--trainer.max_steps=3",
        "--trainer.callbacks+=tests.test_mae_cli.RecordStart",
    ]
    term = '--trainer.callbacks+={"class_path": "tests.test_reliability_resume.KillAtStep", ' + (
        '"init_args": {"step": 1, "sig": "SIGTERM"}}'
    )
    before = signal.getsignal(signal.SIGTERM)
    assert main([*args, term]) == 143
    assert signal.getsignal(signal.SIGTERM) == before
    last = run / "checkpoints" / "last.ckpt"
    assert (
        torch.load(last, weights_only=True)["global_step"] == 2
    )  # the running batch finished, then the save
    assert not list(run.glob("checkpoints/*.tmp-*")) and not Path("runs").exists()  # all in the run folder

    # by path: its hyper-parameters are read (weights_only) into the model config, like fit's
    resumed = tmp_path / "preempted.ckpt"
    resumed.write_bytes(last.read_bytes())
    assert main([*args, "--ckpt_path", str(resumed)]) == 0
    assert (run / "start_step.txt").read_text() == "2"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    # by name: `last` is the run folder's last.ckpt (Lightning's look-up), here the step-3 one
    assert main([*args, "--trainer.max_steps=4", "--ckpt_path", "last"]) == 0
    assert (run / "start_step.txt").read_text() == "3"

    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Evil(marker)}}, evil)
    capsys.readouterr()
    assert main([*args, "--ckpt_path", str(evil)]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "Traceback" not in err and not marker.exists()
