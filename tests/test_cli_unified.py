"""The `idrecog` training commands end to end: every shipped config parses, fit runs on a tiny generated set,
and a short real training learns (loss falls, doc_type accuracy beats chance)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

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
    "training/ema.yaml": "unified.yaml",
    "antifraud/detail.yaml": "unified.yaml",
    "antifraud/hires.yaml": "unified.yaml",
    "small_data.yaml": "unified.yaml",
}

# a tiny model for CPU tests, as command-line overrides of unified.yaml (the encoder's img_size follows data's)
TINY = [
    "--model.init_args.encoder.init_args.depth=1",
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
            str(CONFIGS / "unified.yaml"),
            f"--trainer.default_root_dir={tmp_path / 'run'}",
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


@pytest.mark.slow
def test_short_training_learns(tiny_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "unified.yaml"),
            f"--trainer.default_root_dir={tmp_path / 'run'}",
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


# ------------------------------------------------------------------ one run folder, any catalogue, one image size
def _output_paths(cfg: dict) -> list[str]:
    """Every logger ``save_dir`` and callback ``dirpath`` / ``output_dir`` of a printed config."""
    trainer = cfg["trainer"]
    loggers = trainer.get("logger") or []
    parts = [*(loggers if isinstance(loggers, list) else [loggers]), *(trainer.get("callbacks") or [])]
    out = []
    for part in parts:
        args = part.get("init_args") or {} if isinstance(part, dict) else {}
        out += [str(args[k]) for k in ("save_dir", "dirpath", "output_dir") if args.get(k)]
    return out


@pytest.mark.parametrize(
    "files",
    [
        ["unified.yaml"],
        ["unified_base.yaml"],
        ["task_classifier.yaml"],
        ["unified.yaml", "logging/wandb.yaml"],
    ],
)
def test_outputs_follow_default_root_dir(
    files: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit"] + [a for f in files for a in ("--config", str(CONFIGS / f))]
    root = tmp_path / "elsewhere"
    for extra, expected in (([], None), ([f"--trainer.default_root_dir={root}"], str(root))):
        capsys.readouterr()
        try:
            code = main([*args, *extra, "--print_config"])
        except SystemExit as e:  # LightningCLI exits after printing
            code = e.code
        assert code in (0, None)
        cfg = yaml.safe_load(capsys.readouterr().out)
        expected = expected or cfg["trainer"]["default_root_dir"]
        paths = _output_paths(cfg)
        assert len(paths) >= 2, paths  # at least the logger and the checkpoints
        assert all(p == expected or p.startswith(expected + "/") for p in paths), (expected, paths)


def test_two_roots_write_two_run_folders(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the config's default root (runs/unified) would land here
    rules = tmp_path / "lightning_configs" / "rules"
    rules.mkdir(parents=True)  # the prediction writer's rule file is relative to the working directory
    (rules / "default.yaml").write_text((CONFIGS / "rules" / "default.yaml").read_text())
    common = [
        "--config",
        str(CONFIGS / "unified.yaml"),
        *TINY,
        f"--data.root={tiny_dataset}",
        "--data.batch_size=6",
        "--trainer.max_epochs=1",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        assert main(["fit", *common, f"--trainer.default_root_dir={root}"]) == 0
        assert (root / "checkpoints" / "last.ckpt").is_file() and (
            root / "checkpoints" / "best.ckpt"
        ).is_file()
        assert list(root.glob("lightning_logs/version_0/metrics.csv"))
        assert list(root.glob("lightning_logs/version_0/config.yaml"))
    ckpt = a / "checkpoints" / "last.ckpt"
    limit = "--trainer.limit_predict_batches=1"
    assert main(["predict", *common, limit, f"--trainer.default_root_dir={a}", f"--ckpt_path={ckpt}"]) == 0
    assert (a / "predictions" / "predictions.jsonl").is_file() and not (b / "predictions").exists()
    assert not (tmp_path / "runs").exists()


def test_fit_default_config_on_a_classification_only_catalogue(
    tiny_dataset_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_dataset_factory("cls", n_train=8, n_val=4, n_test=4, task_types={"classification"})
    assert "detection" not in (data / "tasks.yaml").read_text()
    root = tmp_path / "run"
    args = ["fit", "--config", str(CONFIGS / "unified.yaml"), *TINY, f"--data.root={data}"]
    fit = [*args, f"--trainer.default_root_dir={root}", "--data.batch_size=4", "--trainer.max_epochs=1"]
    assert main(fit) == 0
    header = _read_metrics(root)[0].keys()
    assert "val/doc_type/accuracy" in header and not [k for k in header if k.startswith("val/fields/")]
    # an option key that is neither a registered task type nor a task of the catalogue is still an error
    capsys.readouterr()
    assert main([*fit, "--model.init_args.task_options={detektion: {num_queries: 4}}"]) == 2
    err = capsys.readouterr().err
    assert "detektion" in err and "neither task types" in err


def test_image_size_is_written_once(tiny_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from idrecog.cli.train import build_cli

    args = ["--config", str(CONFIGS / "unified.yaml"), *TINY, f"--data.root={tiny_dataset}"]
    cli = build_cli([*args, "--data.img_size=[48, 80]"], run=False)
    assert cli.model.model.encoder.img_size == (48, 80) == tuple(cli.datamodule.img_size)
    # an encoder size set apart from the data's is named in one line before any work
    other = "--model.init_args.encoder.init_args.img_size=[32, 48]"
    assert main(["fit", *args, other, "--trainer.fast_dev_run=true"]) == 2
    assert "data.img_size (64, 96) differs from the encoder's img_size (32, 48)" in capsys.readouterr().err


BAD_CONFIGS = {
    "syntax": ("trainer:\n  max_epochs: [1\n", ":3:1: not valid YAML", "flow sequence that starts at line 2"),
    "tab": ("trainer:\n\tmax_epochs: 1\n", ":2:1: not valid YAML", "'\\t'"),
    "empty": ("", ": the config file is empty", ""),
    "list": ("- trainer\n- model\n", ": a config file holds a mapping", "holds a list"),
}


@pytest.mark.parametrize("command", ["fit", "pretrain"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_file_is_named(
    command: str, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, where, detail = BAD_CONFIGS[case]
    bad = tmp_path / "mine.yaml"
    bad.write_text(text, encoding="utf-8")
    first = ["--config", str(CONFIGS / "unified.yaml")] if command == "fit" else []
    assert main([command, *first, f"--config={bad}", "--print_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"idrecog {command}: error: {bad}{where}"), err
    assert detail in err[0]
