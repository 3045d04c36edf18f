"""Interrupted training: SIGKILL mid-epoch then ``--ckpt_path last`` ends with the same weights and metrics as an
uninterrupted run; SIGTERM saves a checkpoint and exits 143; checkpoints are written atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from idrecog.cli import main as idrecog_main
from idrecog.utils.checkpoint import atomic_torch_save

REPO = Path(__file__).resolve().parents[1]


class KillAtStep(L.Callback):
    """Sends ``sig`` to its own process when ``global_step`` reaches ``step`` (a deterministic preemption)."""

    def __init__(self, step: int, sig: str = "SIGKILL") -> None:
        self.step = step
        self.sig = sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.sig))


class DumpMetrics(L.Callback):
    """Writes the final ``callback_metrics`` to ``{default_root_dir}/metrics.json``."""

    def on_fit_end(self, trainer, pl_module) -> None:  # type: ignore[override]
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        Path(trainer.default_root_dir, "metrics.json").write_text(json.dumps(m, sort_keys=True))


def tiny_config(
    data: Path, run: Path, *, max_epochs: int = 2, extra_callbacks: list[dict] | None = None
) -> Path:
    """A tiny deterministic LightningCLI config (1-block 32-wide ViT, 64 x 96 images, checkpoints every 2 steps)."""
    cfg: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": max_epochs,
            "deterministic": True,
            "default_root_dir": str(run),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 1,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run / "checkpoints"),
                        "every_n_train_steps": 2,
                        "save_top_k": -1,
                        "save_last": True,
                        "filename": "{epoch}-{step}",
                    },
                },
                {"class_path": "tests.test_reliability_resume.DumpMetrics"},
                *(extra_callbacks or []),
            ],
        },
        "model": {
            "class_path": "idrecog.lit.unified.UnifiedModule",
            "init_args": {
                "encoder": {
                    "class_path": "idrecog.models.encoder.ViTEncoder",
                    "init_args": {
                        "name": "vit_tiny_patch16_224",
                        "img_size": [64, 96],
                        "depth": 1,
                        "embed_dim": 32,
                        "num_heads": 2,
                    },
                },
                "decoder": {
                    "class_path": "idrecog.models.decoder.TaskDecoder",
                    "init_args": {"dim": 32, "depth": 1, "num_heads": 2},
                },
                "task_options": {"detection": {"num_queries": 4}},
                "warmup_steps": 2,
            },
        },
        "data": {
            "root": str(data),
            "img_size": [64, 96],
            "batch_size": 2,
            "augment": False,
            "preflight_cache_dir": str(run.parent / "preflight-cache"),
        },
    }
    path = run.parent / f"{run.name}.yaml"
    run.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(
    tiny_dataset_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_dataset_factory("d", n_train=8, n_val=2, n_test=2)  # 4 steps per epoch, 8 in all
    killed = tmp_path / "killed"
    kill = [{"class_path": "tests.test_reliability_resume.KillAtStep", "init_args": {"step": 7}}]
    cfg_killed = tiny_config(data, killed, extra_callbacks=kill)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    # the run to kill is a real process; the uninterrupted run goes on meanwhile, here
    proc = subprocess.Popen(
        [sys.executable, "-m", "idrecog.cli", "fit", "--config", str(cfg_killed)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    full = tmp_path / "full"
    assert idrecog_main(["fit", "--config", str(tiny_config(data, full))]) == 0
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out.decode()[-3000:]
    # killed during step 8 of 8... no: at the start of step 8 (global_step 7), mid-epoch 1, after the step-6 save
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert "epoch=1-step=6.ckpt" in names and "epoch=1-step=8.ckpt" not in names, names
    assert not [n for n in names if ".tmp-" in n]
    last = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert last["IdDataModule"]["train_sampler"] == {"epoch": 1, "batches_done": 2}

    # resume the killed run (its config without the kill) from its last checkpoint
    cfg_resume = tiny_config(data, killed)
    assert idrecog_main(["fit", "--config", str(cfg_resume), "--ckpt_path", "last"]) == 0
    a, b = _state(full / "checkpoints" / "last.ckpt"), _state(killed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    changed = max(
        float((a[k].float() - _state(full / "checkpoints" / "epoch=0-step=2.ckpt")[k].float()).abs().max())
        for k in a
        if a[k].numel()
    )
    print(
        f"resume: max abs weight diff {diff:.3g} over {len(a)} tensors (training moved weights by up to {changed:.3g})"
    )
    assert changed > 0 and diff == 0.0
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    val = {k: v for k, v in ma.items() if k.startswith("val/")}
    assert val and {k: mb[k] for k in val} == val
    print(f"resume: {len(val)} val metrics equal, e.g. val/loss={val.get('val/loss')}")


def test_sigterm_saves_checkpoint_and_exits_143(tiny_dataset_factory: Any, tmp_path: Path) -> None:
    data = tiny_dataset_factory("d", n_train=8, n_val=2, n_test=2)
    run = tmp_path / "term"
    term = [
        {"class_path": "tests.test_reliability_resume.KillAtStep", "init_args": {"step": 1, "sig": "SIGTERM"}}
    ]
    before = signal.getsignal(signal.SIGTERM)
    code = idrecog_main(["fit", "--config", str(tiny_config(data, run, extra_callbacks=term))])
    assert code == 143
    assert signal.getsignal(signal.SIGTERM) == before  # Lightning put the handler back
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # the running (second) batch finished, then the checkpoint: mid-epoch 0, 2 of its 4 batches trained
    assert ckpt["global_step"] == 2 and ckpt["IdDataModule"]["train_sampler"] == {
        "epoch": 0,
        "batches_done": 2,
    }
    assert not (run / "metrics.json").exists()  # the run did not finish


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"v": torch.ones(3)}, path)

    def crash(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"v": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_last_checkpoint_is_the_final_step_after_a_finished_fit(tmp_path: Path) -> None:
    """Lightning 2.6 refreshes ``save_last`` only when its callback saves; a monitored best checkpoint whose
    metric stops improving would leave ``last.ckpt`` behind. ``PreemptionCheckpoint`` saves the final step, and
    ``--ckpt_path last`` resumes from there."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from idrecog.callbacks.reliability import PreemptionCheckpoint

    class Worsening(BoringModel):
        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().validation_step(batch, batch_idx)
            self.log("v", -float(self.current_epoch))  # the first validation stays the best
            return out

    def trainer(epochs: int) -> L.Trainer:
        best = ModelCheckpoint(
            dirpath=tmp_path,
            filename="best",
            monitor="v",
            mode="max",
            save_last=True,
            enable_version_counter=False,
        )
        return L.Trainer(
            max_epochs=epochs,
            limit_train_batches=4,
            limit_val_batches=1,
            callbacks=[best, PreemptionCheckpoint()],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    t = trainer(3)
    t.fit(Worsening())
    assert t.global_step == 12
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["global_step"] == 4
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 12
    resumed = trainer(4)
    resumed.fit(Worsening(), ckpt_path="last")
    assert resumed.global_step == 16  # one more epoch from step 12, not three from step 4
