"""The `idrecog` training commands end to end: every shipped config parses, fit runs on a tiny generated set,
and a short real training learns (loss falls, doc_type accuracy beats chance)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from idrecog.cli import main
from idrecog.synth.generate import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lightning_configs"

# full configs, and fragments that are used after a full config
FULL = ["unified.yaml", "unified_base.yaml", "task_classifier.yaml"]
FRAGMENTS = {
    "ddp.yaml": "unified_base.yaml",
    "fsdp.yaml": "unified_base.yaml",
    "logging/wandb.yaml": "unified.yaml",
    "queries/text.yaml": "unified.yaml",
    "queries/multimodal.yaml": "unified.yaml",
    "encoders/hybrid.yaml": "unified.yaml",
    "antifraud/detail.yaml": "unified.yaml",
    "antifraud/hires.yaml": "unified.yaml",
    "small_data.yaml": "unified.yaml",
}

# a tiny model for CPU tests, as command-line overrides of unified.yaml
TINY = [
    "--model.init_args.encoder.init_args.depth=1",
    "--model.init_args.encoder.init_args.img_size=[64, 96]",
    "--model.init_args.decoder.init_args.dim=64",
    "--model.init_args.decoder.init_args.depth=1",
    "--data.img_size=[64, 96]",
    "--data.num_workers=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_every_config_is_covered() -> None:
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    shipped -= {p for p in shipped if p.startswith(("rules/", "sweeps/"))}  # not LightningCLI configs
    assert shipped == set(FULL) | set(FRAGMENTS), "add new configs to this test"


@pytest.mark.parametrize("config", FULL + list(FRAGMENTS))
def test_config_parses(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    files = [config] if config in FULL else [FRAGMENTS[config], config]
    args = ["fit"]
    for f in files:
        args += ["--config", str(CONFIGS / f)]
    try:
        code = main([*args, "--print_config"])
    except SystemExit as e:  # LightningCLI exits after printing
        code = e.code
    captured = capsys.readouterr()
    assert code in (0, None), captured.err
    out = captured.out
    assert "model:" in out and "class_path:" in out and "trainer:" in out


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "d"
    generate_dataset(root, train=192, val=32, test=16, seed=1, height=64, width=96, workers=2, progress=False)
    return root


def test_fit_fast_dev_run(tiny_synth: Path, tmp_path: Path) -> None:
    code = main(
        [
            "fit",
            "--config",
            str(_config_in(tmp_path)),
            *TINY,
            f"--data.root={tiny_synth}",
            "--trainer.fast_dev_run=true",
            "--data.batch_size=4",
        ]
    )
    assert code == 0


def _read_metrics(log_dir: Path) -> list[dict[str, str]]:
    files = sorted(log_dir.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {log_dir}"
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def _config_in(tmp_path: Path) -> Path:
    """unified.yaml with every output path moved under tmp_path."""
    text = (CONFIGS / "unified.yaml").read_text().replace("runs/unified", str(tmp_path / "run"))
    p = tmp_path / "unified.yaml"
    p.write_text(text)
    return p


@pytest.mark.slow
def test_short_training_learns(tiny_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "fit",
            "--config",
            str(_config_in(tmp_path)),
            *TINY,
            f"--data.root={tiny_synth}",
            "--trainer.max_epochs=10",
            "--trainer.log_every_n_steps=1",
            "--data.batch_size=16",
            "--data.augment=false",
            "--model.init_args.warmup_steps=10",
            "--model.init_args.lr=0.003",
        ]
    )
    assert code == 0
    rows = _read_metrics(tmp_path)
    train = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(train) >= 20
    first, last = sum(train[:5]) / 5, sum(train[-5:]) / 5
    assert last < 0.8 * first, f"training loss did not fall: {first:.3f} -> {last:.3f}"
    acc = [float(r["val/doc_type/accuracy"]) for r in rows if r.get("val/doc_type/accuracy")]
    assert max(acc) > 1 / 6 + 0.15, f"doc_type accuracy {acc} does not beat chance (1/6)"
    out = capsys.readouterr().out
    assert "validation metrics" in out and "doc_type" in out  # the per-task table is printed
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_query_design_shorthands_expand() -> None:
    from idrecog.cli.train import expand_shorthands, query_shorthands

    argv = ["fit", "--model.queries=text", "--model.queries", "multimodal", "--data.root", "learned"]
    assert expand_shorthands(argv) == [
        "fit",
        f"--model.queries={query_shorthands()['text']}",
        "--model.queries",
        query_shorthands()["multimodal"],
        "--data.root",
        "learned",  # only the value of --model.queries is a design name
    ]
