"""Non-finite losses, untrusted checkpoints, configuration errors (one line, exit code 2), incompatible
checkpoints; and a grep-style audit that every torch.load / yaml load in idrecog is the safe kind."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from idrecog.cli import main as idrecog_main
from idrecog.data.datamodule import IdDataModule
from idrecog.errors import ConfigError, NonFiniteLossError
from idrecog.lit.unified import UnifiedModule, load_unified
from idrecog.models.decoder import TaskDecoder
from idrecog.models.encoder import ViTEncoder
from idrecog.utils.checkpoint import AtomicCheckpointIO, load_checkpoint
from tests.test_reliability_resume import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _module(**kw: Any) -> UnifiedModule:
    enc = ViTEncoder("vit_tiny_patch16_224", img_size=(64, 96), depth=1, embed_dim=32, num_heads=2)
    return UnifiedModule(
        encoder=enc,
        decoder=TaskDecoder(dim=32, depth=1, num_heads=2),
        task_options={"detection": {"num_queries": 4}},
        **kw,
    )


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def _flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in m.parameters()])


def test_nonfinite_loss_skips_steps_then_stops(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = IdDataModule(
        str(tiny_dataset), img_size=(64, 96), batch_size=4, augment=False, preflight_cache_dir=str(tmp_path)
    )
    module = _module(max_nonfinite_steps=2)
    tt = module.task_types["image_quality"]
    real_loss = tt.loss
    calls = {"n": 0}

    def nan_twice(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        return out * float("nan") if calls["n"] <= 2 else out

    monkeypatch.setattr(tt, "loss", nan_twice)
    before = _flat(module)
    with pytest.warns(
        RuntimeWarning, match=r"non-finite training loss .*tasks: image_quality\).*step skipped"
    ) as rec:
        _trainer(2).fit(module, datamodule=dm)
    assert len([w for w in rec if "non-finite" in str(w.message)]) == 2
    assert torch.equal(_flat(module), before)  # neither NaN step touched the weights
    assert module._nonfinite_run == 2

    # a loss that stays NaN: stopped after max_nonfinite_steps + 1 steps with a clear error
    module = _module(max_nonfinite_steps=2)
    before = _flat(module)
    monkeypatch.setattr(module.task_types["card_mask"], "loss", lambda *a, **k: torch.tensor(float("inf")))
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(NonFiniteLossError, match=r"3 consecutive training steps.*card_mask"),
    ):
        _trainer(10).fit(module, datamodule=dm)
    assert torch.equal(_flat(module), before)  # never stepped on an inf loss
    # a finite step resets the count
    module = _module(max_nonfinite_steps=0)
    assert module._check_finite(torch.tensor(1.0), torch.ones(len(module.task_names)), torch.tensor(0.0))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(
    tmp_path: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Evil(marker)}}, evil)
    for load in (load_checkpoint, load_unified, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(ConfigError, match="refused to load"):
            load(evil)
        assert not marker.exists()
    # through the CLI: resuming from it is refused with one line and exit code 2, before any work
    cfg = tiny_config(tiny_dataset, tmp_path / "run", max_epochs=1)
    capsys.readouterr()
    assert idrecog_main(["fit", "--config", str(cfg), "--ckpt_path", str(evil)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("idrecog fit: error: ")
        and "refused to load" in err[-1]
        and "Traceback" not in "".join(err)
    )
    assert not marker.exists()
    assert not list((tmp_path / "run").glob("**/*.ckpt"))


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--trainer.bogus_option=1"], r"bogus_option"),
        (["--trainer.max_epochs=abc"], r"max_epochs"),
        (
            ["--model.init_args.encoder.init_args.name=vit_tiny_patch16_2244"],
            r"did you mean vit_tiny_patch16_224",
        ),
        (["--data.on_error=ignore"], r"data\.on_error must be one of"),
    ],
)
def test_config_errors_one_line_exit_2(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], pattern: str
) -> None:
    cfg = tiny_config(tiny_dataset, tmp_path / "run", max_epochs=1)
    capsys.readouterr()
    assert idrecog_main(["fit", "--config", str(cfg), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("idrecog fit: error: ") and re.search(pattern, err[0]), err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing ran


def test_checkpoint_from_another_catalogue_refused(
    tiny_dataset_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_dataset_factory("a", n_train=4, n_val=2, n_test=2)
    run = tmp_path / "a_run"
    assert idrecog_main(["fit", "--config", str(tiny_config(data, run, max_epochs=1))]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    # the same data with another catalogue: one task dropped, the classes of another changed
    other = tiny_dataset_factory("b", n_train=4, n_val=2, n_test=2)
    cat = yaml.safe_load((other / "tasks.yaml").read_text())
    cat["tasks"] = [t for t in cat["tasks"] if t["name"] != "image_quality"]
    for t in cat["tasks"]:
        if t["name"] == "visibility":
            t["classes"] = [*t["classes"], "unknown"]
    cat["doc_types"] = {k: [n for n in v if n != "image_quality"] for k, v in cat["doc_types"].items()}
    (other / "tasks.yaml").write_text(yaml.safe_dump(cat, sort_keys=False))
    for f in ("train.jsonl", "val.jsonl", "test.jsonl"):
        lines = (other / f).read_text().replace('"image_quality": ', '"_iq": ').splitlines()
        (other / f).write_text("\n".join(re.sub(r', "_iq": [^,}]+', "", ln) for ln in lines) + "\n")
    capsys.readouterr()
    code = idrecog_main(
        ["fit", "--config", str(tiny_config(other, tmp_path / "b_run")), "--ckpt_path", str(ckpt)]
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(err) == 1 and "catalogue differs" in err[0], err
    assert "'image_quality' only in the checkpoint" in err[0] and "'visibility'" in err[0]
    assert not list((tmp_path / "b_run").glob("**/*.ckpt"))


def test_audit_safe_loading() -> None:
    """Every torch.load in idrecog passes weights_only=True; every YAML load is a safe one."""
    loads, yamls = [], []
    for path in (REPO / "idrecog").rglob("*.py"):
        text = path.read_text()
        loads += [(path, m) for m in re.findall(r"torch\.load\([^)]*\)", text)]
        yamls += [(path, m) for m in re.findall(r"yaml\.(?:load|unsafe_load|full_load|load_all)\b", text)]
        assert "pickle.load" not in text, path
    assert loads and all("weights_only=True" in m for _, m in loads), loads
    assert not yamls, yamls
