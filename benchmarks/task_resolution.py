"""Task resolution when training samples lack a doc type: the task classifier against oracle doc types and
against dropping those samples (issue 6), optionally inside a fixed wall-clock budget.

    python3 -m benchmarks.task_resolution --source data/synthetic --time-budget 280 \\
        --accelerator gpu --precision bf16-mixed --num-workers 4 --out OUT

1. **Data.** With ``--source DIR`` (an existing dataset whose train and val lines all have ``doc_type``, e.g. the
   default ``data/synthetic``) nothing is generated: ``WORK/oracle`` and ``WORK/dropped_0.3`` are derived from it
   (``images``, ``masks``, ``frames`` are symlinks to the source's folders; ``tasks.yaml`` is copied; the
   manifests are rewritten, optionally cut to the first ``--train`` / ``--val`` lines). In ``dropped``, exactly
   ``--drop`` of the train lines lose their ``doc_type`` (seeded; the ``doc_type`` *label* stays). Validation
   lines keep their doc type, so ``val/score`` is measured on the same tasks in every run. Without ``--source``
   the synthetic benchmark is generated once into ``WORK/generated``.
2. **Task classifier** (``TaskClassifierModule``, resnet18 at 96 x 160 by default) trained on the train samples
   of ``dropped`` that kept their doc type. The script feeds it the images alone (decoded once per loader worker,
   the DataModule's train transform at the classifier's input size) rather than through ``IdDataModule``, which
   would also load masks, frames and labels it does not use. Its exact-match ratio (the whole task set right,
   threshold ``--threshold``) is measured with the ``classifier`` resolver itself (fp32, eval transform) on val
   and on the train samples whose doc type was removed, split into samples whose document is visible and
   samples that show no document (``labels.doc_type`` null: ``visibility: none``), plus the best reachable
   figure and the training labels its errors lose.
3. **Unified model** (``lightning_configs/unified.yaml``, seed ``--train-seed``, default ``--seed``) trained three times with the **same number
   of optimiser steps**: (a) ``dropped`` with ``task_resolver: classifier``; (b) ``oracle`` with the doc-type
   resolver; (c) ``dropped`` with ``doc_type`` resolver ``missing: skip``. Each ends with one validation pass.

**Time budget.** ``--time-budget SECONDS`` bounds the whole script from process start (imports included).
After the data step, ``--classifier-share`` of what is left goes to the classifier (a short throughput probe,
training with a step count fitted to its slot, evaluation); the rest to the unified runs: a short probe of the
unified training throughput (and of one validation pass) fixes one step count for all three runs (equal steps is
the fairer choice: equal ``max_time`` would give each run as many steps as the shared machine's load allowed at
that moment, and a time-cut cosine schedule never anneals). ``max_time`` is only a guard on each run; a run it
cut short is flagged. A watchdog prints the table of what finished and exits (code 3) if the budget runs out
anyway. Without ``--time-budget``, ``--steps`` (default 600) and ``--classifier-epochs`` (default 4) are used.

Results: a Markdown table on stdout and in ``OUT/results.md``, everything in ``OUT/results.json``
(``OUT`` defaults to ``WORK``, ``data/task_resolution``). No text encoder is needed (``unified.yaml`` uses
learned task queries).
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # the budget counts from here (the heavy imports below included)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REPO,
    Budget,
    StepTimer,
    derive_config,
    exit_at,
    loader_settings,
    quiet_trainer,
    resolve_device,
    unified_cli,
    validate_once,
    write_results,
)

RUNS = {
    "a": "classifier resolver",
    "b": "oracle doc types",
    "c": "skip samples without doc_type",
}


def now() -> float:
    return time.monotonic() - T_START


def say(msg: str) -> None:
    print(f"[bench {now():6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ report
class Report:
    """Results so far; ``finish`` prints the Markdown tables and writes results.json / results.md (once)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.done = False
        self.data: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
            + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "fairness": None,
            "data": {},
            "classifier": {},
            "unified": {},
            "seconds": {},
        }

    def markdown(self, incomplete: str | None) -> str:
        d = self.data
        out: list[str] = []
        if incomplete:
            out.append(f"**INCOMPLETE: {incomplete}**\n")
        c = d["classifier"]
        if c.get("eval"):
            e = c["eval"]
            out.append("| classifier exact match | all | document visible | no document visible |")
            out.append("|---|---|---|---|")
            for key, name in (("val", "val"), ("train_without_doc_type", "train samples without doc_type")):
                if key in e:
                    r = e[key]
                    cells = [
                        f"{r[k]['exact_match']:.4f} (n={r[k]['n']})" if r[k]["n"] else "-"
                        for k in ("all", "visible", "no_document")
                    ]
                    out.append(f"| {name} | " + " | ".join(cells) + " |")
            if "val" in e:
                v = e["val"]
                out.append(
                    f"\nval ceiling (every visible sample right, the most common task set guessed for the "
                    f"samples without a visible document): {v['ceiling']:.4f}; target 0.98 "
                    f"{'met' if v['all']['exact_match'] >= 0.98 else 'not met'} on all val samples, "
                    f"{'met' if v['visible']['exact_match'] >= 0.98 else 'not met'} on those with a visible document."
                )
            if "train_without_doc_type" in e:
                t = e["train_without_doc_type"]
                out.append(
                    f"train samples without doc_type: the classifier's task sets drop {t['labels_lost']} of their "
                    f"{t['labels_total']} labels (a wrongly dropped task that has a label); "
                    f"{t['spurious_tasks']} spurious tasks (no label, masked: no effect on training here)."
                )
            out.append(
                f"classifier: {c.get('steps', '?')} steps ({c.get('epochs', 0):.1f} epochs of "
                f"{c.get('train_samples', '?')} samples) in {c.get('train_seconds', 0):.0f} s\n"
            )
        u = d["unified"]
        if u:
            out.append(f"unified runs: {d.get('fairness') or ''}\n")
            out.append("| run | train samples | steps | train s | stopped by | val/score |")
            out.append("|---|---|---|---|---|---|")
            for key in ("a", "b", "c"):
                r = u.get(key)
                if r is None:
                    continue
                score = r.get("val/score")
                out.append(
                    f"| ({key}) {r['label']} | {r.get('train_samples', '-')} | {r.get('steps', '-')} | "
                    f"{r.get('train_seconds', 0):.0f} | {r.get('stopped_by', '-')} | "
                    + (f"{score:.4f}" if score is not None else "not finished")
                    + " |"
                )
            tasks = sorted({t for r in u.values() for t in r.get("per_task", {})})
            if tasks:
                out.append("\n| task (primary metric) | " + " | ".join(f"({k})" for k in u) + " |")
                out.append("|---|" + "---|" * len(u))
                for t in tasks:
                    cells = []
                    for r in u.values():
                        v = r.get("per_task", {}).get(t)
                        cells.append(f"{v[1]:.4f}" if v else "-")
                    metric = next(r["per_task"][t][0] for r in u.values() if t in r.get("per_task", {}))
                    out.append(f"| {t} ({metric}) | " + " | ".join(cells) + " |")
            sa, sb, sc = (u.get(k, {}).get("val/score") for k in "abc")
            if sa is not None and sb is not None:
                out.append(
                    f"\n(a) - (b) = {sa - sb:+.4f} (target: within 1 point = 0.01 of val/score: "
                    f"{'met' if abs(sa - sb) <= 0.01 else 'not met'})"
                )
            if sa is not None and sc is not None:
                out.append(f"(a) - (c) = {sa - sc:+.4f} (target: above: {'met' if sa > sc else 'not met'})")
        out.append(f"\nseconds: {json.dumps({k: round(v, 1) for k, v in d['seconds'].items()})}")
        return "\n".join(out)

    def finish(self, incomplete: str | None = None) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
            self.data["incomplete"] = incomplete
            self.data["seconds"]["total"] = now()
            md = self.markdown(incomplete)
            print("\n" + md, flush=True)
            out = self.args.out
            try:
                js, md_path = write_results(out, self.data, md)
                print(f"results: {js}, {md_path}", flush=True)
            except OSError as e:
                print(f"could not write the results to {out}: {e}", flush=True)


# ------------------------------------------------------------------------------------------------ data
def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in path.read_text().splitlines() if raw.strip()]


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


def derive_datasets(
    source: Path, work: Path, train: int, val: int, seed: int, drop: float
) -> tuple[Path, Path, dict[str, Any]]:
    """WORK/oracle and WORK/dropped_{drop} from ``source``: folders symlinked, manifests rewritten."""
    from idrecog.errors import ConfigError

    source = source.resolve()
    if not (source / "tasks.yaml").is_file():
        raise ConfigError(f"--source {source}: no tasks.yaml (not a dataset folder)")
    rows = {}
    for split, n in (("train", train), ("val", val)):
        f = source / f"{split}.jsonl"
        if not f.is_file():
            raise ConfigError(f"--source {source}: no {split}.jsonl")
        r = _lines(f)
        r = r[:n] if n else r
        no_dt = sum("doc_type" not in x for x in r)
        if no_dt:
            raise ConfigError(
                f"--source {f}: {no_dt} of the {len(r)} lines used have no doc_type; the oracle run needs them "
                "all (use a dataset made without --drop-doc-type)"
            )
        rows[split] = r
    oracle, dropped = work / "oracle", work / f"dropped_{drop:g}"
    rng = random.Random(seed)
    n_drop = round(drop * len(rows["train"]))
    drop_ids = set(rng.sample(range(len(rows["train"])), n_drop))
    for root in (oracle, dropped):
        if root.is_symlink() or root.is_file():
            root.unlink()
        elif root.exists():
            shutil.rmtree(root)  # only links and manifests: rmtree unlinks the links, never follows them
        root.mkdir(parents=True)
        for sub in ("images", "masks", "frames"):
            if (source / sub).is_dir():
                (root / sub).symlink_to(source / sub, target_is_directory=True)
        shutil.copy(source / "tasks.yaml", root / "tasks.yaml")
        _write(root / "val.jsonl", rows["val"])
    _write(oracle / "train.jsonl", rows["train"])
    train_dropped = []
    for i, obj in enumerate(rows["train"]):
        if i in drop_ids:
            obj = {k: v for k, v in obj.items() if k != "doc_type"}  # the doc_type label stays
        train_dropped.append(obj)
    _write(dropped / "train.jsonl", train_dropped)
    info = {
        "source": str(source),
        "train": len(rows["train"]),
        "val": len(rows["val"]),
        "train_without_doc_type": n_drop,
        "train_no_document": sum(r["labels"].get("doc_type") is None for r in rows["train"]),
        "val_no_document": sum(r["labels"].get("doc_type") is None for r in rows["val"]),
    }
    return oracle, dropped, info


def generate_source(work: Path, train: int, val: int, seed: int, workers: int) -> Path:
    """Without --source: the synthetic benchmark generated once into WORK/generated."""
    from idrecog.synth.generate import generate_dataset

    out = work / "generated"

    def lines(split: str) -> int:
        f = out / f"{split}.jsonl"
        return len(f.read_text().splitlines()) if f.is_file() else -1

    if lines("train") != train or lines("val") != val:
        generate_dataset(out, train=train, val=val, test=0, seed=seed, workers=workers, overwrite=True)
    return out


# ------------------------------------------------------------------------------------------------ classifier
class ClassifierImages(torch.utils.data.Dataset):
    """The samples' main images at the classifier's input size (decoded once per worker), the DataModule's
    transform (train: augmented) after it; items ``{"image": [3, h, w], "doc_type": str}``."""

    def __init__(self, samples: list[Any], input_size: tuple[int, int], train: bool) -> None:
        from torchvision.transforms import v2

        from idrecog.data.transforms import build_transforms

        self.paths = [Path(s.source).parent / s.image for s in samples]
        self.doc_types = [s.doc_type for s in samples]
        self.resize = v2.Resize(tuple(input_size), antialias=True)
        self.transform = build_transforms("fit" if train else "test", tuple(input_size), augment=train)
        self.cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from idrecog.data.dataset import read_rgb

        img = self.cache.get(i)
        if img is None:
            img = self.cache[i] = self.resize(read_rgb(self.paths[i]))
        x = self.transform({"image": img, "frames": None, "targets": {}})["image"]
        return {"image": x.as_subclass(torch.Tensor), "doc_type": self.doc_types[i]}


def _collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": torch.stack([x["image"] for x in items]), "doc_type": [x["doc_type"] for x in items]}


def _fit_classifier(
    args: argparse.Namespace, cat: Any, loader: Any, max_steps: int, max_time: float | None, callbacks: list
) -> tuple[Any, Any]:
    import lightning as L

    from idrecog.lit.task_classifier import TaskClassifierModule

    L.seed_everything(args.seed, verbose=False)
    module = TaskClassifierModule(
        catalogue=cat.to_dict(),
        backbone=args.classifier_backbone,
        input_size=tuple(args.classifier_input_size),
        warmup_steps=min(20, max(1, max_steps // 10)),
    )
    trainer = L.Trainer(
        **quiet_trainer(
            args.accelerator,
            args.precision,
            args.work / "runs" / "classifier",
            max_time_s=max_time,
            max_steps=max_steps,
            callbacks=callbacks,
        )
    )
    trainer.fit(module, train_dataloaders=loader)
    return module, trainer


def train_classifier(args: argparse.Namespace, dropped: Path, slot: float | None, report: Report) -> Path:
    """Train on the samples of ``dropped`` that kept their doc type; ``slot`` seconds in all (None: epochs)."""
    from torch.utils.data import DataLoader

    from idrecog.data.manifest import read_manifest
    from idrecog.tasks.catalogue import load_catalogue

    t_stage = time.monotonic()
    cat = load_catalogue(dropped / "tasks.yaml")
    samples = [s for s in read_manifest(dropped / "train.jsonl", cat) if s.doc_type is not None]
    ds = ClassifierImages(samples, tuple(args.classifier_input_size), train=True)
    loader = DataLoader(
        ds,
        batch_size=args.classifier_batch_size,
        shuffle=True,
        drop_last=len(ds) > args.classifier_batch_size,
        **loader_settings(args.num_workers, args.accelerator),
        collate_fn=_collate_images,
        generator=torch.Generator().manual_seed(args.seed),
    )
    per_epoch = max(1, len(loader))
    c = report.data["classifier"]
    c["train_samples"] = len(ds)
    if slot is None:
        steps, max_time = args.classifier_epochs * per_epoch, None
    else:
        probe = StepTimer(sync=True, stop_after=min(10.0, max(3.0, 0.12 * slot)))
        _fit_classifier(args, cat, loader, 10**6, None, [probe])
        rate = probe.steps_per_s(skip=2)
        eval_reserve = max(5.0, 0.15 * slot)
        train_s = slot - (time.monotonic() - t_stage) - eval_reserve - 3.0
        # the loader's workers start again (a new fit): ~1 s; 0.9: the rate's uncertainty
        steps = int(rate * max(1.0, train_s - 1.0) * 0.9) if math.isfinite(rate) else per_epoch
        steps = max(1, min(steps, args.classifier_max_epochs * per_epoch))
        max_time = max(2.0, train_s)
        c["probe"] = {"steps": len(probe.ends), "steps_per_s": rate, "seconds": probe.stop_after}
        say(
            f"classifier probe: {rate:.2f} steps/s (batch {args.classifier_batch_size}); "
            f"training {steps} steps (~{steps / per_epoch:.1f} epochs) in <= {max_time:.0f} s"
        )
    clock = StepTimer()
    module, trainer = _fit_classifier(args, cat, loader, steps, max_time, [clock])
    c["steps"] = int(trainer.global_step)
    c["planned_steps"] = steps
    c["epochs"] = trainer.global_step / per_epoch
    c["train_seconds"] = clock.train_seconds
    if trainer.global_step < steps:
        c["stopped_by"] = "max_time"
    ckpt = args.work / "runs" / "classifier" / "task_classifier.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(ckpt)
    del trainer, module, loader
    gc.collect()  # ends the persistent loader workers now
    return ckpt


def resolver_args(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    """The classifier resolver's arguments, the same in the evaluation (which fills the cache) and run (a)."""
    return {
        "task_classifier_ckpt": str(ckpt),
        "threshold": args.threshold,
        "cache_dir": str(args.work / "cache"),
        "num_workers": args.num_workers,
    }


def evaluate_classifier(
    args: argparse.Namespace, oracle: Path, dropped: Path, ckpt: Path, report: Report
) -> None:
    """Exact match of the classifier resolver's task sets against the true doc type's, on val and on the train
    samples without doc type, split by whether the image shows the document; and it fills run (a)'s cache."""
    from idrecog.data.manifest import read_manifest
    from idrecog.data.resolution import DocTypeResolver
    from idrecog.data.resolution.classifier import ClassifierResolver
    from idrecog.tasks.catalogue import load_catalogue

    cat = load_catalogue(dropped / "tasks.yaml")
    truth_of = DocTypeResolver(cat)
    e: dict[str, Any] = {}
    report.data["classifier"]["eval"] = e

    # the most common task set among the train samples that kept their doc type: the best guess for an image
    # that shows no document
    known_train = [s for s in read_manifest(dropped / "train.jsonl", cat) if s.doc_type is not None]
    common = Counter(tuple(t) for t in truth_of.resolve(known_train, "train")).most_common(1)[0][0]

    def score(samples: list[Any], true_samples: list[Any], pred: list[list[str]]) -> dict[str, Any]:
        """samples as the classifier saw them, the same with their doc type (the truth), its task sets."""
        truth = truth_of.resolve(true_samples, "eval")
        out: dict[str, Any] = {}
        groups = {
            "all": range(len(samples)),
            "visible": [i for i, s in enumerate(samples) if s.labels.get("doc_type") is not None],
            "no_document": [i for i, s in enumerate(samples) if s.labels.get("doc_type") is None],
        }
        for g, idx in groups.items():
            idx = list(idx)
            hits = sum(pred[i] == truth[i] for i in idx)
            out[g] = {"n": len(idx), "exact_match": hits / len(idx) if idx else float("nan"), "hits": hits}
        nd = groups["no_document"]
        guess_hits = sum(tuple(truth[i]) == common for i in nd)
        out["no_document"]["most_common_set_hits"] = guess_hits
        out["ceiling"] = (len(groups["visible"]) + guess_hits) / max(1, len(samples))
        lost = spurious = total = 0
        per_task: Counter[str] = Counter()
        for i, s in enumerate(samples):
            labelled = {t for t in truth[i] if s.labels.get(t) is not None}
            total += len(labelled)
            for t in labelled - set(pred[i]):
                lost += 1
                per_task[t] += 1
            spurious += len(set(pred[i]) - set(truth[i]))
        out.update(
            labels_total=total, labels_lost=lost, labels_lost_per_task=dict(per_task), spurious_tasks=spurious
        )

        def diff(i: int) -> str:
            missing = sorted(set(truth[i]) - set(pred[i]))
            extra = sorted(set(pred[i]) - set(truth[i]))
            what = [f"missing {'+'.join(missing)}"] * bool(missing) + [f"extra {'+'.join(extra)}"] * bool(
                extra
            )
            seen = "visible" if samples[i].labels.get("doc_type") is not None else "no document"
            return f"{true_samples[i].doc_type} ({seen}): {', '.join(what)}"

        wrong = Counter(diff(i) for i in range(len(samples)) if pred[i] != truth[i])
        out["errors"] = dict(wrong.most_common(12))
        return out

    # 1. run (a)'s own resolver on the dropped train split (fills its cache: run (a) gets a cache hit)
    r = ClassifierResolver(cat, **resolver_args(args, ckpt))
    train_d = read_manifest(dropped / "train.jsonl", cat)
    train_o = read_manifest(oracle / "train.jsonl", cat)
    got = r.resolve(train_d, "train")
    e["resolver_train_stats"] = dict(r.last_stats)
    miss = [i for i, s in enumerate(train_d) if s.doc_type is None]
    e["train_without_doc_type"] = score(
        [train_d[i] for i in miss], [train_o[i] for i in miss], [got[i] for i in miss]
    )
    r.resolve(read_manifest(dropped / "val.jsonl", cat), "val")  # run (a)'s val check, cached too
    # 2. every val sample (mode all)
    r_all = ClassifierResolver(cat, **{**resolver_args(args, ckpt), "mode": "all"})
    val = read_manifest(dropped / "val.jsonl", cat)
    e["val"] = score(val, val, r_all.resolve(val, "val"))
    e["resolver_val_stats"] = dict(r_all.last_stats)
    e["most_common_set"] = list(common)
    v, t = e["val"], e["train_without_doc_type"]
    say(
        f"classifier exact match: val {v['all']['exact_match']:.4f} (visible document "
        f"{v['visible']['exact_match']:.4f}, n={v['visible']['n']}; no document "
        f"{v['no_document']['exact_match']:.4f}, n={v['no_document']['n']}; ceiling {v['ceiling']:.4f}); "
        f"train without doc_type {t['all']['exact_match']:.4f} (n={t['all']['n']})"
    )


# ------------------------------------------------------------------------------------------------ unified
def build_unified(
    args: argparse.Namespace, name: str, root: Path, extra: list[str], trainer_over: dict[str, Any]
) -> Any:
    """One unified run: ``lightning_configs/unified.yaml`` with this benchmark's settings (``WORK/runs/NAME/
    derived.yaml``), then ``extra`` command-line arguments, built by ``idrecog fit``'s LightningCLI (not run)."""
    run_dir = args.work / "runs" / name
    over = {
        "seed_everything": args.train_seed,
        "trainer": quiet_trainer(args.accelerator, args.precision, run_dir, **trainer_over),
        "data": {
            "root": str(root),
            "synthesize_if_missing": False,
            **loader_settings(args.num_workers, args.accelerator),  # persistent: each worker keeps its cache
            "augment": True,  # as in the recorded runs (unified.yaml's short CPU job trains without)
            "batch_size": args.batch_size,
            "preflight": args.preflight,
            "preflight_cache_dir": str(args.work / "cache" / "preflight"),
            "seed": args.train_seed,
        },
    }
    return unified_cli(["--config", str(derive_config(run_dir / "derived.yaml", over)), *extra])


def run_extra(args: argparse.Namespace, key: str, ckpt: Path | None) -> tuple[Path, list[str]]:
    if key == "a":
        assert ckpt is not None
        return args._dropped, [
            "--data.task_resolver=classifier",
            f"--data.resolver_args={json.dumps(resolver_args(args, ckpt))}",
        ]
    if key == "b":
        return args._oracle, []
    return args._dropped, ["--data.task_resolver=doc_type", '--data.resolver_args={"missing": "skip"}']


def per_task_primary(metrics: dict[str, float], catalogue: Any) -> dict[str, tuple[str, float]]:
    from idrecog.tasks.registry import get_task_type_class

    out = {}
    for spec in catalogue:
        pm = get_task_type_class(spec.type).primary_metric
        v = metrics.get(f"val/{spec.name}/{pm}")
        if v is not None:
            out[spec.name] = (pm, float(v))
    return out


def probe_unified(args: argparse.Namespace, seconds: float, report: Report) -> dict[str, float]:
    """Steps/s of the unified training (oracle data), set-up time and one validation pass's time."""
    probe = StepTimer(sync=True, stop_after=seconds)
    t0 = time.perf_counter()  # the step timer's clock
    cli = build_unified(args, "probe", args._oracle, [], {"max_steps": 10**6})
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    setup = (probe.ends[0] - t0) if probe.ends else float("nan")
    t1 = time.perf_counter()
    validate_once(cli.trainer, cli.model, cli.datamodule)
    val_s = time.perf_counter() - t1
    res = {
        "steps": len(probe.ends),
        "steps_per_s": probe.steps_per_s(skip=2),
        "setup_s": setup,
        "val_s": val_s,
    }
    report.data["unified_probe"] = res
    say(
        f"unified probe: {res['steps_per_s']:.2f} steps/s (batch {args.batch_size}), set-up to first step "
        f"{setup:.1f} s, validation {val_s:.1f} s"
    )
    del cli
    gc.collect()  # ends the persistent loader workers now
    return res


def train_unified(
    args: argparse.Namespace, key: str, ckpt: Path | None, steps: int, max_time: float | None, report: Report
) -> None:
    root, extra = run_extra(args, key, ckpt)
    r: dict[str, Any] = {"label": RUNS[key], "planned_steps": steps}
    report.data["unified"][key] = r
    warmup = min(50, max(1, round(0.1 * steps)))
    over: dict[str, Any] = {"max_steps": steps, "max_time_s": max_time}
    t0 = time.perf_counter()  # the step timer's clock
    cli = build_unified(args, key, root, [*extra, f"--model.init_args.warmup_steps={warmup}"], over)
    clock = StepTimer()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    r["steps"] = int(cli.trainer.global_step)
    r["warmup_steps"] = warmup
    r["train_seconds"] = clock.train_seconds
    r["setup_seconds"] = (clock.start or t0) - t0
    r["stopped_by"] = "max_steps" if r["steps"] >= steps else "max_time (guard)"
    ds = cli.datamodule.datasets.get("train")
    r["train_samples"] = len(ds) if ds is not None else None
    t1 = time.perf_counter()
    metrics = validate_once(cli.trainer, cli.model, cli.datamodule)
    r["val_seconds"] = time.perf_counter() - t1
    r["metrics"] = metrics
    r["per_task"] = per_task_primary(metrics, cli.datamodule.catalogue)
    r["val/score"] = metrics.get("val/score")
    say(
        f"({key}) {RUNS[key]}: {r['steps']} steps in {r['train_seconds']:.0f} s ({r['stopped_by']}), "
        f"val/score {r['val/score']:.4f}"
    )
    del cli
    gc.collect()


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--source",
        type=Path,
        default=None,
        help="existing dataset (e.g. data/synthetic) to derive oracle/dropped from; none: generate",
    )
    p.add_argument(
        "--work",
        "--root",
        type=Path,
        default=REPO / "data" / "task_resolution",
        help="derived datasets, checkpoints, caches (default data/task_resolution)",
    )
    p.add_argument("--out", type=Path, default=None, help="results.json and results.md (default: --work)")
    p.add_argument(
        "--train",
        type=int,
        default=None,
        help="train lines used (with --source: the first N, 0 = all; generated: 2000)",
    )
    p.add_argument("--val", type=int, default=None, help="val lines used (as --train; generated: 300)")
    p.add_argument("--drop", type=float, default=0.3, help="fraction of train samples without doc_type")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="wall-clock seconds for the whole script, from process start",
    )
    p.add_argument(
        "--classifier-share",
        type=float,
        default=0.25,
        help="with --time-budget: the classifier's share of the time left after the data step",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimiser steps of each unified run (default 600; with --time-budget: an upper bound)",
    )
    p.add_argument("--classifier-epochs", type=int, default=4, help="without --time-budget")
    p.add_argument("--classifier-max-epochs", type=int, default=60, help="with --time-budget: an upper bound")
    p.add_argument("--classifier-backbone", default="resnet18")
    p.add_argument("--classifier-input-size", type=int, nargs=2, default=[96, 160])
    p.add_argument("--classifier-batch-size", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32, help="unified batch size (unified.yaml's 32)")
    p.add_argument(
        "--num-workers", type=int, default=1, help="DataLoader workers (classifier, resolver, unified)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--synth-workers", type=int, default=2, help="without --source: generator processes")
    p.add_argument("--accelerator", default="cpu", help="cpu | gpu | auto")
    p.add_argument("--precision", default=None, help="default: 32-true on CPU, bf16-mixed on GPU")
    p.add_argument(
        "--preflight", action="store_true", help="run the DataModule's pre-flight scan in each run"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="seed of the unified runs only (init, shuffle); default --seed. Same data and classifier, another\n"
        "training seed: the run-to-run spread of val/score that (a) vs (b) is judged against",
    )
    p.add_argument("--runs", default="a,b,c", help="which unified runs: a (classifier), b (oracle), c (skip)")
    p.add_argument(
        "--classifier-only", action="store_true", help="train and evaluate the classifier, no runs"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke: 240 train / 60 val lines, --time-budget 300 unless given",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.train = args.train if args.train is not None else 240
        args.val = args.val if args.val is not None else 60
        if args.time_budget is None:
            args.time_budget = 300.0
    if args.source is None:
        args.train = args.train or 2000
        args.val = args.val or 300
    else:
        args.train = args.train or 0
        args.val = args.val or 0
    if args.train_seed is None:
        args.train_seed = args.seed
    args.accelerator, args.precision = resolve_device(args.accelerator, args.precision)
    if args.out is None:
        args.out = args.work
    runs = [k.strip() for k in args.runs.split(",") if k.strip()]
    bad = [k for k in runs if k not in RUNS]
    if bad:
        p.error(f"--runs: unknown run(s) {bad}; choose from a, b, c")
    args.runs = ",".join(runs)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accelerator == "gpu":
        torch.set_float32_matmul_precision("high")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    budget = args.time_budget
    clock = Budget(budget or None, T_START)
    report = Report(args)
    # at the deadline: print what finished, write the JSON, end the process (code 3)
    watchdog = exit_at(
        clock.left() - 1.0,
        lambda: report.finish(f"the time budget ran out at {now():.0f} s (watchdog)"),
        3,
    )
    secs = report.data["seconds"]
    secs["imports"] = now()
    say(
        f"budget {budget or 'none'} s; {args.accelerator} {args.precision}, {args.num_workers} workers, "
        f"runs {args.runs}"
    )

    t0 = now()
    if args.source is not None:
        source = args.source
    else:
        source = generate_source(args.work, args.train, args.val, args.seed, args.synth_workers)
    oracle, dropped, info = derive_datasets(source, args.work, args.train, args.val, args.seed, args.drop)
    args._oracle, args._dropped = oracle, dropped
    report.data["data"] = info
    secs["data"] = now() - t0
    say(f"data: {info}")

    end_reserve = max(4.0, 0.03 * budget) if budget else 0.0
    runs = [] if args.classifier_only else args.runs.split(",")
    ckpt = None
    if "a" in runs or args.classifier_only:
        t0 = now()
        slot = args.classifier_share * (clock.left() - end_reserve) if budget else None
        ckpt = train_classifier(args, dropped, slot, report)
        secs["classifier_train"] = now() - t0
        t0 = now()
        evaluate_classifier(args, oracle, dropped, ckpt, report)
        secs["classifier_eval"] = now() - t0

    if not runs:
        pass
    elif budget:
        left = clock.left() - end_reserve
        t0 = now()
        pr = probe_unified(args, seconds=min(20.0, max(4.0, 0.06 * left)), report=report)
        secs["unified_probe"] = now() - t0
        left = clock.left() - end_reserve
        rate = pr["steps_per_s"]
        step_s = 1.0 / rate if math.isfinite(rate) and rate > 0 else 1.0
        # per run besides its steps: set-up to the first step (the probe's, less its first step; it also paid
        # one-time costs, so this errs long) and the final validation
        overhead = 1.2 * (max(0.0, pr["setup_s"] - step_s) + pr["val_s"]) + 2.0
        train_s = left / len(runs) - overhead
        steps = max(1, int(train_s / step_s * 0.9)) if train_s > 0 else 1
        if args.steps:
            steps = min(steps, args.steps)
        report.data["unified_plan"] = {"per_run_overhead_s": overhead, "train_s": train_s, "steps": steps}
        report.data["fairness"] = (
            f"equal optimiser steps ({steps} each, fitted to the budget from the probe's "
            f"{rate:.2f} steps/s); max_time only guards the budget"
        )
    else:
        steps = args.steps or 600
        report.data["fairness"] = f"equal optimiser steps ({steps} each)"
    if runs:
        say(f"unified runs: {report.data['fairness']}")

    for i, key in enumerate(runs):
        max_time = None
        if budget:
            after = len(runs) - i - 1  # what the runs after this one need
            max_time = (clock.left() - end_reserve) - overhead - after * (overhead + steps * step_s)
            max_time = max(2.0, max_time)
        t0 = now()
        train_unified(args, key, ckpt, steps, max_time, report)
        secs[f"unified_{key}"] = now() - t0

    if watchdog is not None:
        watchdog.cancel()
    report.finish()
    if budget:  # results are written: do not let worker/CUDA teardown run past the budget
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
