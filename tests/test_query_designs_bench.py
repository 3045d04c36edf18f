"""benchmarks/query_designs.py end to end on a tiny dataset: the time-budget probe, the tiny text encoder, the
same step count for every design, the Markdown table and the JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import benchmarks.query_designs as qd


@pytest.mark.slow
def test_query_designs_under_a_time_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from idrecog.synth.generate import generate_dataset

    # --time-budget counts from the module's import (the process start when run as a script): here, from now
    monkeypatch.setattr(qd, "T_START", time.monotonic())

    data = generate_dataset(
        tmp_path / "data", train=8, val=6, test=0, height=64, width=96, workers=1, progress=False
    )
    out = tmp_path / "out"
    argv = ["--data", str(data), "--img", "64", "96", "--small", "--threads", "1", "--batch-size", "4"]
    argv += ["--seeds", "0", "--designs", "learned", "multimodal", "--text-model", "tiny"]
    argv += ["--time-budget", "170", "--max-steps", "3", "--probe-steps", "3", "--out", str(out)]
    assert qd.main(argv) == 0
    text = capsys.readouterr().out
    assert "text encoder: tiny random BERT" in text and (out / "tiny-bert" / "config.json").is_file()
    assert "| multimodal | 0 | 3 |" in text and "| learned | 0 | 3 |" in text  # same steps for both
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["steps"] == 3 and "probe" in res["meta"]
    assert [r["steps"] for r in res["runs"]] == [3, 3]
    assert all("val/hologram/accuracy" in r["metrics"] for r in res["runs"])
    assert (out / "results.md").read_text().startswith("Query designs: 3 optimiser steps")
    assert res["baselines"]["nationality_match/n"] > 0 or "nationality_match/n" not in res["baselines"]

    # --merge: runs made one seed at a time give one table with mean ± std per design; refuses mixed step counts
    other = tmp_path / "other"
    other.mkdir()
    res["runs"] = [dict(r, seed=1, metrics=dict(r["metrics"], **{"val/score": 0.25})) for r in res["runs"]]
    (other / "results.json").write_text(json.dumps(res))
    merged = tmp_path / "merged"
    assert qd.main(["--merge", str(out), str(other / "results.json"), "--out", str(merged)]) == 0
    table = (merged / "results.md").read_text()
    assert "| learned | 0 | 3 |" in table and "| learned | 1 | 3 |" in table
    row = next(line for line in table.splitlines() if line.startswith("| multimodal | 2 |"))
    assert " ± " in row
    res["meta"]["steps"] = 4
    (other / "results.json").write_text(json.dumps(res))
    with pytest.raises(SystemExit, match="different step counts"):
        qd.main(["--merge", str(out), str(other), "--out", str(merged)])


def test_set_overrides_the_design_options(tmp_path: Path) -> None:
    # --set comes last on each run's command line, so it wins over what the script sets per design
    # (before, --set model.init_args.queries.init_args.image_mode=... was silently undone by --image-mode)
    args = qd.parse_args(["--set", "model.queries.image_mode=separate", "--set", "model.lr=0.5"])
    args.text_dir = None  # main() sets it once the text encoder is located
    argv = qd.cli_args("multimodal", 0, 3, args, tmp_path, tmp_path)
    assert argv[-2:] == ["--model.queries.image_mode=separate", "--model.lr=0.5"]
    assert argv.index("--model.queries.image_mode=separate") > argv.index(
        f"--model.queries.image_mode={args.image_mode}"
    )


def test_a_skipped_run_is_named_like_a_trained_one() -> None:
    # rows of runs the budget skipped go into the same table: a multimodal one names its image mode
    args = qd.parse_args(["--image-mode", "separate"])
    assert qd.label(qd.skipped_run("multimodal", 1, "time budget", args)) == "multimodal (separate)"
    assert qd.label(qd.skipped_run("learned", 1, "time budget", args)) == "learned"
    assert "skipped: time budget" in qd.markdown(
        [qd.skipped_run("multimodal", 0, "time budget", qd.parse_args([]))],
        {},
        {"steps": 3, "args": vars(args), "device": "cpu", "text_model": "none"},
    )
