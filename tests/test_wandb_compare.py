"""W&B logging (offline), the sweep command through the CLI parser, ``idrecog compare``, and ``idrecog fit``
with the multimodal design on the tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.test_queries_text_mm import make_tiny_bert

REPO = Path(__file__).resolve().parents[1]
UNIFIED = str(REPO / "lightning_configs/unified.yaml")
WANDB_CFG = str(REPO / "lightning_configs/logging/wandb.yaml")
SMALL = [
    "--model.encoder.init_args.img_size=[64, 96]",
    "--model.encoder.init_args.depth=1",
    "--model.encoder.init_args.embed_dim=32",
    "--model.encoder.init_args.num_heads=2",
    "--model.decoder.init_args.dim=32",
    "--model.decoder.init_args.depth=1",
    "--model.task_options={detection: {num_queries: 4}}",
    "--data.img_size=[64, 96]",
    "--data.batch_size=4",
    "--data.num_workers=0",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert"))


def sweep_command(params: dict) -> list[str]:
    """The command line a W&B agent builds from the sweep file for one parameter set (wandb's own helpers)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep = yaml.safe_load((REPO / "lightning_configs/sweeps/task_queries.yaml").read_text())
    for key, value in params.items():
        assert value in sweep["parameters"][key]["values"]
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros = {"${env}": ["/usr/bin/env"], "${args}": flags["args"], "${interpreter}": ["python"]}
    out: list[str] = []
    for chunk in create_sweep_command(list(sweep["command"])):
        out += macros.get(chunk, [chunk])
    return out


def test_sweep_values_land_in_the_resolved_config(tiny_dataset: Path, tiny_bert: str, monkeypatch) -> None:
    from idrecog.cli.train import build_cli

    monkeypatch.chdir(tiny_dataset.parent)
    cmd = sweep_command({"model.queries": "text", "seed_everything": 1})
    assert cmd[:3] == ["/usr/bin/env", "idrecog", "fit"]
    assert "--model.queries=text" in cmd and "--seed_everything=1" in cmd
    argv = [a.replace("lightning_configs/", f"{REPO}/lightning_configs/") for a in cmd[3:]]
    cli = build_cli(
        [*argv, f"--model.queries.model_dir={tiny_bert}", f"--data.root={tiny_dataset}", *SMALL], run=False
    )
    cfg = cli.config
    assert cfg.seed_everything == 1
    assert cfg.model.init_args.queries.class_path == "idrecog.models.queries_text.TextQueries"
    assert type(cli.model.model.queries).__name__ == "TextQueries"
    wandb_loggers = [lg for lg in cli.trainer.loggers if type(lg).__name__ == "WandbLogger"]
    assert len(wandb_loggers) == 1
    init = wandb_loggers[0]._wandb_init
    assert init["group"] == "text" and init["name"] == "text-s1" and "text" in init["tags"]
    assert wandb_loggers[0]._offline  # no API key in tests


def test_wandb_offline_logs_config_and_images(tiny_dataset: Path, tiny_bert: str, monkeypatch) -> None:
    import wandb

    from idrecog.cli.train import build_cli

    monkeypatch.chdir(tiny_dataset.parent)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    argv = [
        "fit",
        f"--config={UNIFIED}",
        f"--config={WANDB_CFG}",
        "--model.queries=multimodal",
        f"--model.queries.model_dir={tiny_bert}",
        "--model.queries.width=16",
        "--model.queries.num_heads=2",
        "--model.queries.frame_pool=[1, 2]",
        "--seed_everything=1",
        f"--data.root={tiny_dataset}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        *SMALL,
    ]
    try:
        cli = build_cli(argv)
    finally:
        wandb.finish()
    runs = list((tiny_dataset.parent / "runs/unified/wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = runs[0] / "files"
    # offline, wandb 0.31 keeps the config in the run's record file (files/config.yaml appears on sync): the
    # fully resolved LightningCLI config (data section, trainer loggers), not only the module's hparams
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for needle in ("idrecog.models.multimodal.MultimodalQueries", str(tiny_dataset), "multimodal-s1"):
        assert needle.encode() in record, needle
    images = list((files / "media/images/val").glob("predictions_*.png"))
    masks = list((files / "media/images/mask").rglob("*.png"))
    cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "WandbPredictionImages")
    assert cb.logged == 4 and len(images) == 4 and masks  # capped at the batch; mask overlays written
    # the classification report: each task's confusion matrix picture and per-class table
    assert list((files / "media/images/val/doc_type").glob("confusion_matrix_*.png"))
    assert list((files / "media/table/val/doc_type").glob("per_class_*.table.json"))
    # the user vocabularies came from the DataModule at setup and are in the hparams (checkpoints rebuild)
    assert cli.model.hparams["user_features"]["attributes"]["declared_nationality"]


def _csv_run(root: Path, design_path: str, seed: int, holo: float, doc: float) -> Path:
    d = root / "lightning_logs/version_0"
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text(
        "epoch,step,val/hologram/f1_macro,val/doc_type/f1_macro,val/loss\n"
        f"0,9,0.1,0.2,3.0\n1,19,{holo},{doc},\n1,19,,,2.0\n"
    )
    (d / "hparams.yaml").write_text(yaml.safe_dump({"queries": {"class_path": design_path}}))
    (d / "config.yaml").write_text(
        yaml.safe_dump(
            {"seed_everything": seed, "model": {"init_args": {"queries": {"class_path": design_path}}}}
        )
    )
    return root


def test_compare_writes_table_and_chart(tmp_path: Path) -> None:
    from idrecog.cli import main

    a = _csv_run(tmp_path / "a", "idrecog.models.queries.LearnedQueries", 0, 0.5, 0.8)
    b = _csv_run(tmp_path / "b", "idrecog.models.multimodal.MultimodalQueries", 0, 0.9, 0.7)
    c = _csv_run(tmp_path / "c", "idrecog.models.multimodal.MultimodalQueries", 1, 0.7, 0.9)
    w = tmp_path / "w/wandb/offline-run-20240101_000000-abc/files"
    w.mkdir(parents=True)
    (w / "wandb-summary.json").write_text(
        json.dumps({"val/hologram/f1_macro": 0.55, "val/doc_type/f1_macro": 0.6})
    )
    (w / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "value": {
                        "init_args": {"queries": {"class_path": "idrecog.models.queries_text.TextQueries"}}
                    }
                }
            }
        )
    )
    out = tmp_path / "rep/report"
    assert main(["compare", str(a), str(b), str(c), str(tmp_path / "w"), "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "0.8000 ± 0.1000" in rows["multimodal"]  # hologram mean/std of runs b and c (last logged values)
    assert "0.5000 ± 0.0000" in rows["learned"] and "0.5500" in rows["text"]
    assert sum("| multimodal |" in line for line in md.splitlines()) == 3  # two runs + the design mean
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_fit_multimodal_fast_dev_run(tiny_dataset: Path, tiny_bert: str, monkeypatch) -> None:
    from idrecog.cli import main

    monkeypatch.chdir(tiny_dataset.parent)
    code = main(
        [
            "fit",
            f"--config={UNIFIED}",
            "--model.queries=multimodal",
            f"--model.queries.model_dir={tiny_bert}",
            "--model.queries.width=16",
            "--model.queries.num_heads=2",
            "--model.queries.image_mode=shared",
            "--trainer.fast_dev_run=true",
            f"--data.root={tiny_dataset}",
            *SMALL,
        ]
    )
    assert code == 0
