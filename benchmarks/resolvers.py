"""Which tasks train on each sample: resolution by the annotations (oracle), by doc type, by nothing, by the task
classifier and by the unified model's gate, on the synthetic benchmark whose task sets are not a function of the
doc type.

    python -m benchmarks.resolvers [--root data/synthetic] [--unannotated 0.3] [--steps 60] [--seeds 0 1 2]
                                   [--arms oracle doc_type nothing classifier gate] [--queries learned]
                                   [--out runs/bench_resolvers]
    python -m benchmarks.resolvers --smoke    # a check that it runs (a tiny dataset, 2 steps per arm)

1. **Data.** ``--root`` (the default job's dataset, generated on first use by the first run) carries each sample's
   annotated task set (the manifest's ``tasks``) and, as annotation tools do, default labels for the doc type's
   tasks that do not apply (``genuine`` for a hologram check of an issue without foil, ``match`` for a
   nationality check of a user who gave no details, ...). ``OUT/partial`` is the same dataset (folders
   symlinked) whose train lines lose ``tasks`` at the rate ``--unannotated`` (seeded); val keeps them.
2. **Arms**, each ``idrecog fit`` of ``lightning_configs/unified.yaml`` (with ``--queries multimodal``:
   ``lightning_configs/queries/multimodal.yaml`` on top, the design that reads the frames and the user information,
   so the hologram and nationality checks enter ``val/score``) for ``--steps`` optimiser steps (the warm-up
   cut in proportion), one validation at the end, every arm scored on the annotated val task sets
   (``data.eval_task_resolver: annotated``), so ``val/score`` and the per-task metrics are comparable:

   * ``oracle``: every train sample's annotated task set (``task_resolver: annotated`` on ``--root``);
   * ``doc_type``: the doc type's tasks (the default labels of tasks that do not apply train);
   * ``nothing``: every task with a label (``task_resolver: all``);
   * ``classifier``: annotated sets where given; for the others a task classifier
     (``lightning_configs/task_classifier.yaml``, trained once on the annotated train samples of ``partial`` for
     ``--classifier-steps``) decides (``mode: unannotated``);
   * ``gate``: annotated sets where given; for the others the unified model's own gate decides at each step
     which of the doc type's tasks train (``task_resolver: gate``).

The table (mean and per-seed ``val/score`` and each task's primary metric) goes to OUT/results.md and .json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    derive_config,
    fit_subprocess,
    last_val_metrics,
    load_yaml,
    merged,
    step_bounded_config,
    write_results,
)

ARMS = ("oracle", "doc_type", "nothing", "classifier", "gate")
MULTIMODAL = REPO / "lightning_configs" / "queries" / "multimodal.yaml"
#: the default job's optimiser steps and warm-up (lightning_configs/unified.yaml on its 2000 train samples)
DEFAULT_STEPS, DEFAULT_WARMUP = 189, 50


def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def derive_partial(source: Path, out: Path, rate: float, seed: int) -> tuple[Path, dict[str, Any]]:
    """OUT/partial: ``source`` with a share ``rate`` of its train lines stripped of ``tasks``."""
    from idrecog.errors import ConfigError

    source = source.resolve()
    train = _lines(source / "train.jsonl")
    if not all("tasks" in ln for ln in train):
        raise ConfigError(
            f"{source / 'train.jsonl'}: lines without 'tasks'; the comparison needs a dataset with annotated task "
            "sets (the synthetic benchmark version 2)"
        )
    root = out / "partial"
    if root.exists():
        shutil.rmtree(root)  # links and manifests only: rmtree unlinks links, never follows them
    root.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name == "train.jsonl":
            continue
        (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    drop = set(random.Random(seed).sample(range(len(train)), round(rate * len(train))))
    rows = [{k: v for k, v in ln.items() if k != "tasks"} if i in drop else ln for i, ln in enumerate(train)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    differs = sum(
        sorted(ln["tasks"]) != sorted(_doc_type_tasks(source, ln))
        for ln in train
        if ln.get("doc_type") is not None
    )
    return root, {"train": len(train), "unannotated": len(drop), "task_set_differs_from_doc_type": differs}


def _doc_type_tasks(source: Path, line: dict[str, Any]) -> list[str]:
    doc_types = load_yaml(source / "tasks.yaml").get("doc_types") or {}
    return list(doc_types.get(line["doc_type"], []))


def train_classifier(args: argparse.Namespace, partial: Path) -> Path:
    run = args.out / "task_classifier"
    cfg = derive_config(
        run / "config.yaml",
        {
            "trainer": {
                "max_steps": args.classifier_steps,
                "max_epochs": -1,
                "default_root_dir": str(run),
                "enable_progress_bar": False,
            },
            "data": {"root": str(partial), "task_resolver": "annotated", **args.data_over},
        },
        base=REPO / "lightning_configs" / "task_classifier.yaml",
    )
    wall = fit_subprocess(cfg, run / "fit.log")
    _say(f"task classifier: {args.classifier_steps} steps in {wall:.0f} s")
    best = run / "checkpoints" / "best.ckpt"
    return best if best.is_file() else run / "checkpoints" / "last.ckpt"  # a run too short to validate


def run_arm(
    args: argparse.Namespace, arm: str, seed: int, source: Path, partial: Path, clf: Path | None
) -> dict:
    run = args.out / f"{arm}_s{seed}"
    data: dict[str, Any] = {
        "root": str(partial),
        "eval_task_resolver": "annotated",
        "resolver_args": {},
        **args.data_over,
    }
    if arm == "oracle":
        data.update(root=str(source), task_resolver="annotated")
    elif arm == "nothing":
        data["task_resolver"] = "all"
    elif arm == "classifier":
        data.update(
            task_resolver="classifier",
            resolver_args={
                "task_classifier_ckpt": str(clf),
                "mode": "unannotated",
                "cache_dir": str(args.out),
            },
        )
    else:
        data["task_resolver"] = arm
    warmup = max(1, round(DEFAULT_WARMUP * args.steps / DEFAULT_STEPS))
    over = {"model": {"init_args": {"warmup_steps": warmup}}, "data": data}
    if args.queries == "multimodal":
        over = merged(load_yaml(MULTIMODAL), over)
    cfg = step_bounded_config(run / "config.yaml", run, seed, args.steps, over)
    wall = fit_subprocess(cfg, run / "fit.log")
    return {"arm": arm, "seed": seed, "wall_s": wall, "metrics": last_val_metrics(run)}


def primary_metrics() -> dict[str, str]:
    """{task: its primary val metric key} for the default catalogue."""
    from idrecog.tasks.catalogue import default_catalogue
    from idrecog.tasks.registry import create_task_type

    return {s.name: create_task_type(s).primary_metric for s in default_catalogue()}


def write_table(args: argparse.Namespace, info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    prim = primary_metrics()
    cols = [("score", "val/score")] + [(f"{t} {m}", f"val/{t}/{m}") for t, m in prim.items()]
    lines = [
        f"{args.queries} queries, {args.steps} steps per run, seeds {args.seeds}; {info['unannotated']} of {info['train']} train samples "
        f"without an annotated task set; {info['task_set_differs_from_doc_type']} train samples whose task set "
        "differs from their doc type's; every arm scored on the annotated val task sets",
        "",
        "| arm | " + " | ".join(c for c, _ in cols) + " | val/score per seed |",
        "|---|" + "---:|" * len(cols) + "---|",
    ]
    for arm in args.arms:
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        cells = []
        for _, key in cols:
            vals = [r["metrics"][key] for r in rs if key in r["metrics"]]
            cells.append(f"{statistics.mean(vals):.4f}" if vals else "-")
        per = ", ".join(f"{r['metrics'].get('val/score', float('nan')):.4f}" for r in rs)
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {per} |")
    md = "\n".join(lines)
    print(md, flush=True)
    write_results(
        args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "data": info, "runs": results}, md
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--root", type=Path, default=Path("data/synthetic"), help="a synthetic benchmark v2 folder"
    )
    p.add_argument("--unannotated", type=float, default=0.3, help="share of train lines without `tasks`")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--classifier-steps", type=int, default=150)
    p.add_argument(
        "--queries",
        choices=("learned", "multimodal"),
        default="learned",
        help="the query design every arm trains (multimodal: lightning_configs/queries/multimodal.yaml)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench_resolvers"))
    p.add_argument(
        "--smoke", action="store_true", help="a tiny dataset and 2 steps per arm: checks the script runs"
    )
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.data_over = {}
    if args.smoke:
        from idrecog.synth.generate import generate_dataset

        args.root = args.out / "smoke_data"
        if not (args.root / "train.jsonl").is_file():
            generate_dataset(
                args.root, train=40, val=16, test=0, height=64, width=96, workers=1, progress=False
            )
        # 7 steps: more than the tiny train split's 5 batches, so a run crosses an epoch and validates once at the end
        args.steps, args.classifier_steps, args.seeds = 7, 2, [0]
        args.data_over = {"img_size": [64, 96], "batch_size": 8, "synthesize_if_missing": False}
    elif not (args.root / "train.jsonl").is_file():
        from idrecog.data.datamodule import IdDataModule

        _say(f"generating the default dataset into {args.root}")
        IdDataModule(root=str(args.root)).prepare_data()
    partial, info = derive_partial(args.root, args.out, args.unannotated, seed=0)
    _say(f"data: {info}")
    clf = train_classifier(args, partial) if "classifier" in args.arms else None
    results: list[dict[str, Any]] = []
    for seed in args.seeds:  # seed-major: a cut-short session still has every arm at the first seed
        for arm in args.arms:
            r = run_arm(args, arm, seed, args.root.resolve(), partial, clf)
            _say(
                f"{arm} seed {seed}: val/score {r['metrics'].get('val/score', float('nan')):.4f} ({r['wall_s']:.0f} s)"
            )
            results.append(r)
            write_table(args, info, results)


if __name__ == "__main__":
    main()
