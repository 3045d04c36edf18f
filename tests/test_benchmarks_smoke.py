"""The CPU benchmark scripts stay runnable: each one's ``--smoke`` path (tiny model, a few steps, a tiny generated
dataset) runs in-process and prints its table and ratio lines; ``make bench`` lists them with ``--quick``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import (
    config_seeds_table,
    data_pipeline,
    gpu_check,
    image_quality_probe,
    overhead,
    resolvers,
    run_all,
    scaling,
    small_data,
    tampering_control,
    task_resolution,
    unified_vs_separate,
)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from idrecog.synth.generate import generate_dataset

    root = tmp_path_factory.mktemp("bench") / "synth"
    return generate_dataset(root, train=8, val=4, test=0, height=64, width=96, workers=1, progress=False)


def test_overhead_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert overhead.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for row in ("| plain |", "| lightning (default config) |", "| lightning (bare) |"):
        assert row in out
    assert "ratio to plain" in out


def test_scaling_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert scaling.main(["--smoke", "--no_memory"]) == 0
    out = capsys.readouterr().out
    assert "| encoder alone |" in out and "cost per added task" in out and "of the encoder's step" in out


def test_data_pipeline_smoke(capsys: pytest.CaptureFixture[str], synth_root: Path) -> None:
    assert data_pipeline.main(["--smoke", "--root", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "| loader, 1 workers, cache_images=False |" in out and "verdict: the data pipeline is" in out


def test_unified_vs_separate_smoke(capsys: pytest.CaptureFixture[str], synth_root: Path) -> None:
    assert unified_vs_separate.main(["--smoke", "--root", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "**mean score**" in out and "fewer FLOPs" in out
    # the unified model answers every task in one pass: fewer FLOPs than the eight single-task models
    line = next(x for x in out.splitlines() if x.startswith("compute:"))
    assert float(line.split()[1].rstrip("x")) > 1.0


def test_make_bench_lists_every_cpu_script() -> None:
    listed = {name: args for name, args in run_all.BENCHMARKS}
    for name in ("overhead", "scaling", "data_pipeline", "unified_vs_separate"):
        assert name in listed and (BENCH / f"{name}.py").is_file()
        assert listed[name] == ["--quick"]


def test_image_quality_probe_smoke(capsys: pytest.CaptureFixture[str], synth_root: Path) -> None:
    assert image_quality_probe.main(["--smoke", "--data", str(synth_root)]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert any(k.startswith("1. ridge") for k in rows) and any(k.startswith("3. frozen") for k in rows)
    assert sum(k.startswith("4. encoder trained") for k in rows) == 2  # one per default encoder lr scale
    maes = [
        float(line.rstrip(" |").split(" | ")[-1])
        for k, line in rows.items()
        if k[0].isdigit() or k.startswith("mean")
    ]
    assert all(math.isfinite(v) and v >= 0 for v in maes)


def test_gpu_check_runs_on_cpu_with_a_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    # the GPU script stays ready between GPU sessions: the same code path on the CPU with tiny ViTs
    argv = ["--tiny", "--mae-batch", "2", "--unified-batch", "2", "--warmup", "1", "--steps", "1"]
    assert gpu_check.main([*argv, "--repeats", "1", "--modes", "eager", "--profile", "3"]) == 0
    out = capsys.readouterr().out
    assert "| mae | no |" in out and "| unified | no |" in out
    assert "--- profile unified/eager (3 steps)" in out
    for job in ("mae", "unified"):
        line = next(x for x in out.splitlines() if x.startswith(f"{job}: forward FLOPs by module:"))
        shares = {
            name: float(pct.rstrip("%"))
            for name, pct in (part.rsplit(" ", 1) for part in line.split("module: ", 1)[1].split(", "))
        }
        assert sum(shares.values()) == pytest.approx(100.0, abs=0.5)  # each FLOP counted once
        assert "encoder" in shares
    assert max(shares, key=shares.get) == "encoder"  # the unified model's work is its encoder's


def test_tampering_control_smoke(capsys: pytest.CaptureFixture[str], synth_root: Path) -> None:
    args = ["--root", str(synth_root), "--models", "cnn", "hybrid", "--seconds", "1", "--evals", "1"]
    results = tampering_control.main([*args, "--num-workers", "0", "--batch-size", "4", "--min-quality", "0"])
    out = capsys.readouterr().out
    assert "| cnn |" in out and "| hybrid |" in out
    for r in results:
        assert r["final"]["steps"] >= 1
        assert 0.0 <= r["best"]["val_f1"] <= 1.0 and len(r["final"]["val_f1_per_class"]) == 3


def test_task_resolution_train_seed_seeds_only_the_unified_runs(tmp_path: Path, synth_root: Path) -> None:
    assert task_resolution.parse_args(["--seed", "2", "--work", str(tmp_path)]).train_seed == 2
    args = task_resolution.parse_args(["--seed", "2", "--train-seed", "5", "--work", str(tmp_path)])
    assert (args.seed, args.train_seed) == (2, 5)  # data derivation and the classifier keep --seed
    cli = task_resolution.build_unified(args, "b", synth_root, [], {"max_steps": 1})
    assert cli.datamodule.seed == 5 and cli.config["seed_everything"] == 5


def test_tampering_control_keeps_labelled_and_clean_samples() -> None:
    import torch

    batch = {
        "image": torch.arange(4).float().view(4, 1, 1, 1),
        "present": torch.tensor([[True], [True], [False], [True]]),
        "targets": {
            "tampering": torch.tensor([0, 1, -1, 2]),
            "image_quality": torch.tensor([0.9, 0.3, 0.9, math.nan]),
        },
    }
    x, y = tampering_control._tampering_batch(batch, 0, None)
    assert y.tolist() == [0, 1, 2] and x.flatten().tolist() == [0.0, 1.0, 3.0]
    x, y = tampering_control._tampering_batch(batch, 0, 0.5)  # the unlabelled quality (NaN) is not clean
    assert y.tolist() == [0] and x.flatten().tolist() == [0.0]


def test_config_seeds_table_reads_the_test_table_and_the_step(tmp_path: Path, capsys) -> None:
    """benchmarks/gpu_config_seeds.sh's table: test metrics from the `idrecog test` summary in each run's log,
    the step from its last.ckpt, the fit time from the script's own line; missing pieces print as '-'."""
    import torch

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "hybrid_s1.log").write_text(
        "validation metrics (last epoch)\n[val] score=0.5000\ndoc_type  classification  accuracy=0.1000\n"
        "fit rc=0 fit wall 69\n\ntest metrics\n[test] score=0.6469  gate_accuracy=1.0000\n"
        "doc_type           classification  accuracy=1.0000  accuracy=1.0000  auroc=0.9990\n"
        "card_mask          segmentation    miou=0.7720      loss=0.4  miou=0.7720\n"
    )
    (logs / "default_s0.log").write_text("fit rc=124\n")  # killed: no test table, no checkpoint
    (tmp_path / "hybrid_s1" / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 188}, tmp_path / "hybrid_s1" / "checkpoints" / "last.ckpt")
    config_seeds_table.main(str(tmp_path))
    rows = {r.split(" | ")[0].strip("| "): r for r in capsys.readouterr().out.splitlines()[2:]}
    hybrid = [c.strip() for c in rows["hybrid_s1"].strip("|").split("|")]
    assert hybrid[:5] == ["hybrid_s1", "188", "0.6469", "1.0000", "0.7720"]  # the test value, not the val one
    assert hybrid[-1] == "69" and hybrid[5] == "-"  # image_quality missing from this log
    assert set(c.strip() for c in rows["default_s0"].strip("|").split("|")[1:]) == {"-"}


def test_small_data_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    from collections import Counter

    import yaml

    from idrecog.tasks.classification import balanced_class_weights

    out = tmp_path / "small"
    argv = ["--smoke", "--out", str(out), "--arms", "recipe", "control", "--pretrain-unlabelled", "30"]
    assert small_data.main(argv) == 0
    # a dataset folder of its own: one task, every split >= 80 % one class, all three classes present
    cat = yaml.safe_load((out / "data" / "tasks.yaml").read_text())
    assert [t["name"] for t in cat["tasks"]] == [small_data.TASK] and not cat.get("doc_types")
    for split in ("train", "val", "test"):
        lines = (out / "data" / f"{split}.jsonl").read_text().splitlines()
        counts = Counter(json.loads(line)["labels"][small_data.TASK] for line in lines)
        assert len(counts) == 3 and counts.most_common(1)[0][1] / len(lines) >= 0.8
    res = json.loads((out / "results.json").read_text())
    runs = {r["arm"]: r for r in res["runs"]}

    # MAE read the train images and 30 unlabelled pool captures, never a val or test image
    def names(split: str) -> set[str]:
        rows = (out / "data" / f"{split}.jsonl").read_text().splitlines()
        return {Path(json.loads(x)["image"]).name for x in rows}

    unlabelled = {p.name for p in (out / "unlabelled").iterdir()}
    assert names("train") <= unlabelled and not unlabelled & (names("val") | names("test"))
    assert len(unlabelled) == len(names("train")) + 30 == res["pretrain"]["distinct_images"]
    pre_cfg = yaml.safe_load((out / "configs" / "pretrain.yaml").read_text())
    assert pre_cfg["data"]["source"] == "folder" and pre_cfg["data"]["path"] == str(out / "unlabelled")
    # the recipe fine-tuned from its own MAE checkpoint, with weights settled from the train split's counts
    recipe_cfg = yaml.safe_load((out / "configs" / "recipe.yaml").read_text())
    init_from = recipe_cfg["model"]["init_args"]["encoder"]["init_args"]["init_from"]
    assert init_from.endswith("last.ckpt") and Path(init_from).is_file()
    train_counts = list(res["setup"]["splits"]["train"].values())
    assert runs["recipe"]["class_weights"] == pytest.approx(balanced_class_weights(train_counts))
    # the control trained until it had used the recipe's CPU seconds (pretraining included)
    assert runs["recipe"]["cpu_s"] > runs["recipe"]["finetune_cpu_s"] > 0
    assert runs["control"]["cpu_budget_s"] == pytest.approx(runs["recipe"]["cpu_s"])
    assert runs["control"]["cpu_s"] >= runs["control"]["cpu_budget_s"]
    n_test = sum(res["setup"]["splits"]["test"].values())
    for r in runs.values():
        assert 0.0 <= r["test"]["f1_macro"] <= 1.0 and sum(map(sum, r["test"]["confusion"])) == n_test
    assert "verdict: the recipe" in capsys.readouterr().out


def test_small_data_macro_f1_is_the_task_metric() -> None:
    import numpy as np
    import torch
    from torchmetrics.classification import MulticlassF1Score

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (50,), generator=g)
    pred = torch.where(torch.rand(50, generator=g) < 0.6, y, torch.randint(0, 3, (50,), generator=g))
    pred[pred == 2] = 0  # a class never predicted
    ours = small_data.macro_f1(small_data.confusion(y.numpy(), pred.numpy(), 3))
    theirs = MulticlassF1Score(num_classes=3, average="macro")(pred, y)
    assert ours == pytest.approx(float(theirs), abs=1e-6)
    same = small_data.paired_bootstrap(y.numpy(), pred.numpy(), pred.numpy(), 20, 0)
    assert same["low"] == same["high"] == 0.0 and same["ahead"] == 0.0
    assert np.isfinite(
        list(small_data.paired_bootstrap(y.numpy(), y.numpy(), pred.numpy(), 20, 0).values())
    ).all()


def test_resolvers_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every arm trains on its own resolution and is scored on the annotated val task sets; the partial copy
    lost the task sets of the share asked for, and only those."""
    import json

    out = tmp_path / "res"
    resolvers.main(["--smoke", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in res["runs"]} == set(resolvers.ARMS)
    assert all("val/score" in r["metrics"] for r in res["runs"])
    lines = [json.loads(x) for x in (out / "partial" / "train.jsonl").read_text().splitlines()]
    assert sum("tasks" not in x for x in lines) == res["data"]["unannotated"] == round(0.3 * len(lines))
    configs = {a: (out / f"{a}_s0" / "config.yaml").read_text() for a in resolvers.ARMS}
    assert all("eval_task_resolver: annotated" in c for c in configs.values())
    assert "mode: unannotated" in configs["classifier"] and "task_resolver: gate" in configs["gate"]
    assert "| gate |" in capsys.readouterr().out


def test_resolvers_multimodal_arm_reads_frames_and_user(tmp_path: Path) -> None:
    """``--queries multimodal``: the arm trains the converter design, so the tasks that require frames or the
    user's details are scored (they enter val/score) instead of being left out as with learned queries."""
    import json

    out = tmp_path / "res_mm"
    resolvers.main(["--smoke", "--out", str(out), "--arms", "gate", "--queries", "multimodal"])
    cfg = (out / "gate_s0" / "config.yaml").read_text()
    assert "idrecog.models.multimodal.MultimodalQueries" in cfg and "task_resolver: gate" in cfg
    metrics = json.loads((out / "results.json").read_text())["runs"][0]["metrics"]
    assert "val/score" in metrics and "val/hologram/f1_macro" in metrics
    # a run longer than one epoch (7 steps of 5 batches each) validates once, after its last step
    import csv

    rows = list(csv.DictReader((out / "gate_s0" / "logs" / "version_0" / "metrics.csv").open()))
    val_steps = [int(r["step"]) for r in rows if r.get("val/score")]
    assert val_steps == [6]


def test_small_data_measures_the_documented_model() -> None:
    # only --smoke shrinks the model; a measured run fine-tunes unified.yaml's decoder as the docs say
    measured = small_data.model_overrides(small_data.parse_args([]))["model"]["init_args"]
    assert "decoder" not in measured and measured["encoder"]["init_args"] == {"img_size": [160, 256]}
    smoke = small_data.model_overrides(small_data.parse_args(["--smoke"]))["model"]["init_args"]
    assert smoke["decoder"]["init_args"]["depth"] == 1 and smoke["encoder"]["init_args"]["depth"] == 1
