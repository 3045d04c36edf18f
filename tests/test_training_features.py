"""Lightning features the configs use: EMA weights (lightning_configs/training/ema.yaml, unified_base.yaml), gradient
clipping, and the classification report (confusion matrices, per-class numbers) at validation and test end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from idrecog.cli import main
from idrecog.tasks.catalogue import default_catalogue
from tests.conftest import make_tiny_dataset
from tests.test_cli_unified import CONFIGS, TINY

VAL_REPORT = json.dumps(
    {
        "class_path": "idrecog.callbacks.classification_report.ClassificationReport",
        "init_args": {"stages": ["val"], "plot": False},
    }
)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny fit of unified.yaml + training/ema.yaml with gradient clipping and a validation report."""
    tmp = tmp_path_factory.mktemp("features")
    data = make_tiny_dataset(tmp / "data", n_train=8, n_val=4, n_test=6)
    root = tmp / "run"
    args = [
        "fit",
        "--config",
        str(CONFIGS / "unified.yaml"),
        "--config",
        str(CONFIGS / "training" / "ema.yaml"),
        *TINY,
        f"--data.root={data}",
        f"--trainer.default_root_dir={root}",
        "--data.batch_size=4",
        "--trainer.max_epochs=2",
        "--trainer.gradient_clip_val=1.0",
        "--model.init_args.warmup_steps=1",  # EMA starts after warm-up
        f"--trainer.callbacks+={VAL_REPORT}",
    ]
    assert main(args) == 0
    return data, root


def test_ema_checkpoint_holds_averaged_and_raw_weights(ema_run: tuple[Path, Path]) -> None:
    _, root = ema_run
    # best.ckpt: saved at a validation (last.ckpt is rewritten at the end of fit, after Lightning's
    # EMAWeightAveraging has copied the averaged weights over the raw ones)
    ckpt = torch.load(root / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["global_step"] in (2, 4)
    avg, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert avg.keys() == raw.keys()
    # updated after every optimiser step from step index 1 (warm-up): steps 2..global_step
    assert int(ckpt["averaging_state"]["n_averaged"]) == ckpt["global_step"] - 1
    moved = [k for k in avg if avg[k].is_floating_point() and not torch.equal(avg[k], raw[k])]
    assert moved, "the averaged weights equal the raw ones"


def _rows(path: Path) -> list[list[str]]:
    with path.open() as f:
        return list(csv.reader(f))


def test_validation_report_is_written_beside_the_logs(ema_run: tuple[Path, Path]) -> None:
    data, root = ema_run
    (val,) = root.glob("lightning_logs/version_0/val")  # output_dir None: the logger's log_dir
    names = sorted(p.name for p in val.iterdir())
    # every classification task with a labelled validation sample, and no other
    classification = {t.name for t in default_catalogue() if t.type == "classification"}
    lines = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines() if line]
    labelled = {k for line in lines for k, v in line["labels"].items() if v is not None} & classification
    assert len(labelled) >= 2
    assert names == sorted(f"{t}_{k}.csv" for t in labelled for k in ("confusion", "per_class"))


def test_test_report_matches_the_logged_metrics(ema_run: tuple[Path, Path]) -> None:
    from idrecog.cli.train import build_cli

    data, root = ema_run
    argv = ["test", "--config", str(CONFIGS / "unified.yaml"), *TINY, f"--data.root={data}"]
    cli = build_cli(
        [*argv, f"--trainer.default_root_dir={root}", f"--ckpt_path={root / 'checkpoints/last.ckpt'}"]
    )
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    out = root / "reports" / "test"  # unified.yaml: ${trainer.default_root_dir}/reports, test only
    assert (out / "doc_type_confusion.png").read_bytes()[:4] == b"\x89PNG"
    lines = (data / "test.jsonl").read_text().splitlines()
    labelled = sum(json.loads(line)["labels"].get("doc_type") is not None for line in lines if line)
    for task in ("doc_type", "tampering"):
        confusion = _rows(out / f"{task}_confusion.csv")
        classes = confusion[0][1:]
        cm = torch.tensor([[int(v) for v in r[1:]] for r in confusion[1:]])
        assert [r[0] for r in confusion[1:]] == classes and cm.shape == (len(classes),) * 2
        assert float(cm.trace() / cm.sum()) == pytest.approx(metrics[f"test/{task}/accuracy"], abs=1e-6)
        per_class = {r[0]: r for r in _rows(out / f"{task}_per_class.csv")[1:]}
        for i, c in enumerate(classes):
            support = int(per_class[c][4])
            assert support == int(cm[i].sum())
            if support:
                assert float(per_class[c][2]) == pytest.approx(float(cm[i, i] / support), abs=1e-5)  # recall
        if task == "doc_type":
            assert int(cm.sum()) == labelled


def test_fsdp_composition_turns_off_what_sharding_breaks(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(CONFIGS / "unified_base.yaml")]
    printed = []
    for extra in ([], ["--config", str(CONFIGS / "fsdp.yaml")]):
        capsys.readouterr()
        try:
            main([*args, *extra, "--print_config"])
        except SystemExit:
            pass
        printed.append(yaml.safe_load(capsys.readouterr().out)["trainer"])
    base, fsdp = printed
    cb = [[c["class_path"].rpartition(".")[2] for c in t["callbacks"]] for t in (base, fsdp)]
    assert base["gradient_clip_val"] == 1.0 and "EMAWeightAveraging" in cb[0]
    assert fsdp["gradient_clip_val"] is None and "EMAWeightAveraging" not in cb[1]
    assert set(cb[1]) == set(cb[0]) - {"EMAWeightAveraging"}
