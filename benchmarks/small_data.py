"""Small imbalanced data: the documented recipe against a from-scratch small CNN given the same CPU time.

    .venv/bin/python -m benchmarks.small_data            # about 30 min on 2 CPU cores -> runs/small_data
    .venv/bin/python -m benchmarks.small_data --smoke    # a check that it runs (tiny, seconds)

1. **Data.** The synthetic benchmark (``idrecog synth``'s generator, train split only, ``--pool-size`` captures at
   ``--img-size``) is generated once into ``--pool`` and a one-task dataset folder is cut from it (``OUT/data``:
   its own ``tasks.yaml``, ``{train,val,test}.jsonl``, the images hard-linked): ``issuer``, the issuing country of
   the document (``doc_type``'s prefix: aldoria / borvania / cestria; captures without a ``doc_type`` label, e.g.
   the document out of frame, are left out), ``--train`` / ``--val`` / ``--test`` samples, ``--majority`` of
   each split aldoria and the rest borvania : cestria = 3 : 2 (500 / 150 / 300 at 80 / 12 / 8 % by default).
2. **Arms**, each selecting its checkpoint by validation macro-F1 after every epoch, all scored by the same code
   on the test split:

   * ``default``: ``idrecog fit --config lightning_configs/unified.yaml`` as it is (from scratch, plain
     cross-entropy, 3 epochs), for reference (its detection ``task_options`` removed: the task set has none).
   * ``recipe`` (docs/pretraining.md, "Small labelled datasets"): ``idrecog pretrain`` (the packaged
     ``idrecog/configs/pretrain_mae.yaml``) on the train split's images (with ``--pretrain-unlabelled N``, also
     on N unlabelled captures of the pool that are in no split, as a team's unlabelled captures would be; never a
     val or test image) for ``--pretrain-steps`` steps of ``--pretrain-batch`` at ``--pretrain-base-lr``, then ``idrecog fit --config lightning_configs/unified.yaml
     --config lightning_configs/small_data.yaml`` from that checkpoint (``encoder.init_from``):
     ``class_weights: auto``, augmentation, the epochs it sets. With ``--pretrained-file`` the fine-tune starts from that
     local timm file instead (``encoder.pretrained_file``) and no pretraining runs.
   * ``control``: a timm ``--cnn`` (default ``resnet18``) from scratch with the same data pipeline (augmented
     batches of the same size) and a class-balanced cross-entropy (the same ``balanced_class_weights`` of the
     train counts), AdamW, a cosine over the CPU time, trained until it has used the CPU time the recipe used
     (pretraining included; validation passes count for both).
   * ``scratch`` (optional): the recipe's fine-tune without pretraining, to see what the pretraining adds.

   Every phase runs in this process with no DataLoader workers, so ``time.process_time()`` (every thread of the
   process) is the CPU it used. Run it on an otherwise idle machine: beside another job a CPU second does less
   work (on a 2-core VM the same 192 fine-tune steps took 645 CPU-s beside a training run and 213 CPU-s alone),
   and arms that ran under different load would not get the same work for their seconds; the script warns when
   the load average says the machine is busy.
3. **Report.** Per arm: CPU and wall seconds, steps, best validation macro-F1, test macro-F1, accuracy, recall per
   class and the confusion matrix; the recipe's margin over the control with a paired bootstrap over the test
   samples (95 % interval and the share of resamples where the recipe is ahead). ``OUT/results.json`` and
   ``OUT/results.md``.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the wall clock counts from here (imports included)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REPO,
    UNIFIED_CONFIG,
    bare_argv,
    derive_config,
    ensure_dataset,
    merged,
    write_results,
)

TASK = "issuer"
CLASSES = ("aldoria", "borvania", "cestria")
ISSUERS = {"ald": "aldoria", "brv": "borvania", "cst": "cestria"}
OVERLAY = REPO / "lightning_configs" / "small_data.yaml"
ARMS = ("default", "recipe", "control", "scratch")


def log(msg: str) -> None:
    print(f"[small_data] {time.monotonic() - T0:7.1f}s {msg}", flush=True)


class Clock:
    """CPU seconds (every thread of this process) and wall seconds since it was made."""

    def __init__(self) -> None:
        self.cpu0, self.wall0 = time.process_time(), time.monotonic()

    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def wall(self) -> float:
        return time.monotonic() - self.wall0


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/small_data")
    p.add_argument(
        "--pool", default=None, help="where the synthetic benchmark is generated (default OUT/pool)"
    )
    p.add_argument("--pool-size", type=int, default=2600, help="captures generated into the pool")
    p.add_argument("--img-size", type=int, nargs=2, default=[160, 256])
    p.add_argument("--train", type=int, default=500)
    p.add_argument("--val", type=int, default=150)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--majority", type=float, default=0.8, help="share of the majority class in every split")
    p.add_argument("--arms", nargs="+", default=["default", "recipe", "control"], choices=ARMS)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--pretrain-batch", type=int, default=64)
    # 3e-3 (lr 7.5e-4 at batch 64) fine-tuned better than 1e-3 on validation for two seeds; 1e-2 was unstable
    # (docs/reports/pretraining.md, "The MAE learning rate")
    p.add_argument("--pretrain-base-lr", type=float, default=3e-3, help="lr = base_lr x batch / 256")
    p.add_argument(
        "--pretrain-unlabelled",
        type=int,
        default=0,
        help="MAE also reads this many unlabelled pool captures that are in no split (default: train images only)",
    )
    p.add_argument("--pretrained-file", default=None, help="fine-tune from this timm file instead of MAE")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default: small_data.yaml's")
    p.add_argument("--batch", type=int, default=32, help="fine-tune and control batch (unified.yaml: 32)")
    p.add_argument("--cnn", default="resnet18", help="the control's timm model")
    p.add_argument("--cnn-lr", type=float, default=1e-3)
    p.add_argument("--control-cpu-s", type=float, default=None, help="default: the recipe's CPU seconds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--smoke", action="store_true", help="tiny everything: only checks that the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(
            pool_size=150,
            img_size=[64, 96],
            train=20,
            val=10,
            test=10,
            pretrain_steps=2,
            pretrain_batch=4,
            finetune_epochs=1,
            batch=4,
            threads=1,
            bootstrap=50,
        )
        if args.out == "runs/small_data":
            args.out = "runs/small_data_smoke"
    return args


# ---------------------------------------------------------------------------------------------- data
def split_counts(n: int, majority: float) -> list[int]:
    """Per class of ``CLASSES``: ``majority`` of ``n`` for the first, the rest 3 : 2 over the other two (each at
    least one)."""
    first = round(n * majority)
    rest = n - first
    second = max(1, round(rest * 0.6))
    return [first, second, max(1, rest - second)]


def cut_dataset(pool: Path, out: Path, args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Write the one-task dataset folder ``out`` from the pool's train split; returns {split: {class: n}}. The
    images it took are in ``out/images`` (so what is left of the pool is in no split)."""
    by_class: dict[str, list[dict[str, Any]]] = {c: [] for c in CLASSES}
    with (pool / "train.jsonl").open(encoding="utf-8") as f:
        for raw in f:
            if not raw.strip():
                continue
            obj = json.loads(raw)
            doc_type = (obj.get("labels") or {}).get("doc_type")
            if doc_type:  # null where the document cannot be told (out of frame), or a missing label
                by_class[ISSUERS[doc_type.split("_")[0]]].append(obj)
    rng = random.Random(args.seed)
    for rows in by_class.values():
        rng.shuffle(rows)
    plan = {
        s: split_counts(n, args.majority)
        for s, n in (("train", args.train), ("val", args.val), ("test", args.test))
    }
    for j, c in enumerate(CLASSES):
        need = sum(plan[s][j] for s in plan)
        if len(by_class[c]) < need:
            raise SystemExit(
                f"the pool {pool} has {len(by_class[c])} labelled {c} captures, the splits need {need}: "
                "raise --pool-size (with a new --pool) or lower --train/--val/--test"
            )
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    catalogue = {
        "tasks": [
            {
                "name": TASK,
                "type": "classification",
                "classes": list(CLASSES),
                "query_text": "Which country issued the identity document?",
            }
        ]
    }
    (out / "tasks.yaml").write_text(yaml.safe_dump(catalogue, sort_keys=False), encoding="utf-8")
    taken = dict.fromkeys(CLASSES, 0)
    summary: dict[str, dict[str, int]] = {}
    for split, counts in plan.items():
        lines = []
        for c, k in zip(CLASSES, counts, strict=True):
            for obj in by_class[c][taken[c] : taken[c] + k]:
                src = pool / obj["image"]
                _link(src, out / "images" / src.name)
                lines.append({"id": obj["id"], "image": f"images/{src.name}", "labels": {TASK: c}})
            taken[c] += k
        rng.shuffle(lines)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        summary[split] = dict(zip(CLASSES, counts, strict=True))
    return summary


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy where the file system has none)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def pool_dir(args: argparse.Namespace, out: Path) -> Path:
    """Where the synthetic pool is generated and cut from (``--pool``, default OUT/pool)."""
    return Path(args.pool) if args.pool else out / "pool"


def write_unlabelled(pool: Path, data: Path, out: Path, n: int, seed: int) -> int:
    """``out``: a folder of the train split's images and ``n`` pool captures that are in no split (labels never
    read), for MAE; returns how many images it holds."""
    taken = {p.name for p in (data / "images").iterdir()}  # every split's images
    free = sorted(p for p in (pool / "images" / "train").iterdir() if p.name not in taken)
    if len(free) < n:
        raise SystemExit(
            f"the pool {pool} has {len(free)} captures in no split, --pretrain-unlabelled asks {n}"
        )
    random.Random(seed).shuffle(free)
    with (data / "train.jsonl").open(encoding="utf-8") as f:
        train = [data / json.loads(x)["image"] for x in f if x.strip()]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for src in [*train, *free[:n]]:
        _link(src, out / src.name)
    return len(train) + n


# ---------------------------------------------------------------------------------------------- evaluation
def macro_f1(conf: np.ndarray) -> float:
    """Macro F1 of a confusion matrix (rows: true, columns: predicted); a class with no true and no predicted
    sample scores 0, as torchmetrics' ``MulticlassF1Score(average="macro")`` does."""
    tp = np.diag(conf).astype(float)
    denom = conf.sum(0) + conf.sum(1)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def confusion(y: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    return np.bincount(y * c + pred, minlength=c * c).reshape(c, c)


@torch.no_grad()
def predict(logits_of: Callable[[torch.Tensor], torch.Tensor], loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) class indices over a loader's labelled samples."""
    ys, ps = [], []
    for batch in loader:
        y = batch["targets"][TASK]
        keep = y >= 0
        ps.append(logits_of(batch["image"]).argmax(-1)[keep].cpu())
        ys.append(y[keep])
    return torch.cat(ys).numpy(), torch.cat(ps).numpy()


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    c = len(CLASSES)
    conf = confusion(y, pred, c)
    recall = [float(conf[i, i] / conf[i].sum()) if conf[i].sum() else float("nan") for i in range(c)]
    return {
        "f1_macro": macro_f1(conf),
        "accuracy": float((y == pred).mean()),
        "recall": dict(zip(CLASSES, recall, strict=True)),
        "confusion": conf.tolist(),
    }


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int, seed: int) -> dict[str, float]:
    """Macro-F1 of predictions ``a`` minus ``b`` on resamples of the test samples: 2.5 / 97.5 % quantiles and
    the share of resamples where ``a`` is ahead."""
    rng = np.random.default_rng(seed)
    c = len(CLASSES)
    diffs = np.empty(n)
    for i in range(n):
        idx = rng.integers(0, len(y), len(y))
        diffs[i] = macro_f1(confusion(y[idx], a[idx], c)) - macro_f1(confusion(y[idx], b[idx], c))
    return {
        "low": float(np.quantile(diffs, 0.025)),
        "high": float(np.quantile(diffs, 0.975)),
        "ahead": float((diffs > 0).mean()),
    }


def eval_datamodule(data: Path, args: argparse.Namespace) -> Any:
    from idrecog.data.datamodule import IdDataModule

    dm = IdDataModule(
        root=str(data),
        img_size=tuple(args.img_size),
        batch_size=args.batch,
        augment=False,
        cache_images=True,
        preflight_cache_dir="",
    )
    dm.setup("validate")
    dm.setup("test")
    return dm


# ---------------------------------------------------------------------------------------------- unified arms
def _run_trainer(run: Path, **checkpoint: Any) -> dict[str, Any]:
    """The Trainer settings the fine-tunes and the pretraining share: ``run`` emptied first and holding the files
    and the CSV logs, one ModelCheckpoint in ``run/checkpoints`` with ``checkpoint``'s settings (what each keeps),
    no progress bar or model summary."""
    if run.exists():
        shutil.rmtree(run)
    return {
        "default_root_dir": str(run),
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run), "name": "lightning_logs"},
        },
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(run / "checkpoints"),
                    **checkpoint,
                    "enable_version_counter": False,
                },
            }
        ],
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }


def fit_unified(
    name: str, configs: list[Path], over: dict[str, Any], out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """``idrecog fit --config C1 --config C2 ... --config OUT/configs/<name>.yaml`` in this process; the last file
    holds the run's own settings (paths, quiet trainer, no DataLoader workers). Returns the run's record."""
    from idrecog.cli.train import build_cli

    bench: dict[str, Any] = {
        "seed_everything": args.seed,
        "trainer": {
            **_run_trainer(out / name, filename="best", monitor="val/score", mode="max"),
            "max_time": None,
        },
        "data": {
            "root": str(out / "data"),
            "synthesize_if_missing": False,
            "img_size": list(args.img_size),
            "batch_size": args.batch,
            "num_workers": 0,
            "persistent_workers": False,
            "preflight_cache_dir": "",
        },
    }
    bench = merged(bench, over)
    cfg = out / "configs" / f"{name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(bench, sort_keys=False), encoding="utf-8")
    argv = ["fit"]
    for c in [*configs, cfg]:
        argv += ["--config", str(c)]
    log(f"{name}: idrecog {' '.join(argv)}")
    clock = Clock()
    with bare_argv():
        cli = build_cli(argv, run=True)
    cpu, wall = clock.cpu(), clock.wall()
    trainer = cli.trainer
    best = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    record = {
        "arm": name,
        "command": "idrecog " + " ".join(argv),
        "cpu_s": cpu,
        "wall_s": wall,
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "best_val_f1_macro": float(trainer.checkpoint_callback.best_model_score or float("nan")),  # type: ignore[union-attr]
        "checkpoint": best,
        "class_weights": ((cli.model.hparams.get("task_options") or {}).get(TASK) or {}).get("class_weights"),
    }
    log(
        f"{name}: {record['steps']} steps in {cpu:.0f} CPU-s ({wall:.0f} s wall); best val macro-F1 {record['best_val_f1_macro']:.3f}"
    )
    return record


def unified_logits(ckpt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from idrecog.lit.unified import load_unified

    module = load_unified(ckpt).eval()
    return lambda images: module(images, tasks=[TASK], route="known")["outputs"][TASK]["logits"]


def pretrain(out: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """``idrecog pretrain --config OUT/configs/pretrain.yaml``: the packaged config with the data, length and
    paths of this run. Returns (last checkpoint, record)."""
    from idrecog.cli.pretrain import default_config_path, run_pretrain

    pdir = out / "pretrain"
    if args.pretrain_unlabelled:
        n_images = write_unlabelled(
            pool_dir(args, out),
            out / "data",
            out / "unlabelled",
            args.pretrain_unlabelled,
            args.seed,
        )
        source = {"source": "folder", "path": str(out / "unlabelled")}
    else:
        n_images = args.train
        source = {"source": "manifest", "path": str(out / "data")}
    over = {
        "seed_everything": args.seed,
        "trainer": {
            "max_steps": args.pretrain_steps,
            "val_check_interval": min(50, args.pretrain_steps),
            **_run_trainer(pdir, save_last=True, save_top_k=0),
        },
        "model": {
            "encoder": {"init_args": _encoder_args(args)},
            "base_lr": args.pretrain_base_lr,
            "warmup_steps": 0.1,
        },
        "data": {
            **source,
            "img_size": list(args.img_size),
            "batch_size": args.pretrain_batch,
            "num_workers": 0,
            "persistent_workers": False,
            "val_samples": min(32, args.val),
        },
    }
    cfg = derive_config(out / "configs" / "pretrain.yaml", over, base=default_config_path())
    log(f"pretrain: idrecog pretrain --config {cfg}")
    clock = Clock()
    with bare_argv():
        code = run_pretrain(["--config", str(cfg)])
    if code:
        raise SystemExit(f"idrecog pretrain exited with {code}")
    cpu, wall = clock.cpu(), clock.wall()
    ckpt = pdir / "checkpoints" / "last.ckpt"
    losses = _csv_column(pdir, "train/loss_step")
    record = {
        "command": f"idrecog pretrain --config {cfg}",
        "cpu_s": cpu,
        "wall_s": wall,
        "steps": args.pretrain_steps,
        "images": args.pretrain_steps * args.pretrain_batch,
        "distinct_images": n_images,
        "passes": args.pretrain_steps * args.pretrain_batch / max(1, n_images),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    log(
        f"pretrain: {args.pretrain_steps} steps in {cpu:.0f} CPU-s ({wall:.0f} s wall); loss {record['loss_first']} -> {record['loss_last']}"
    )
    return ckpt, record


def _encoder_args(args: argparse.Namespace) -> dict[str, Any]:
    enc: dict[str, Any] = {"img_size": list(args.img_size)}
    if args.smoke:
        enc["depth"] = 1
    return enc


def _csv_column(root: Path, key: str) -> list[float]:
    import csv

    values: list[float] = []
    for path in sorted(root.rglob("metrics.csv")):
        with path.open(encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    values.append(float(row[key]))
    return values


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What every unified arm sets on top of its configs: the encoder's input size; with ``--smoke`` also a
    one-block encoder and decoder. A measured run trains the configs' own model."""
    init: dict[str, Any] = {"encoder": {"init_args": _encoder_args(args)}}
    if args.smoke:
        init["decoder"] = {"init_args": {"dim": 64, "depth": 1}}
    return {"model": {"init_args": init}}


# ---------------------------------------------------------------------------------------------- control
def train_control(
    out: Path, args: argparse.Namespace, cpu_budget: float, counts: dict[str, int], eval_dm: Any
) -> tuple[dict[str, Any], Callable[[torch.Tensor], torch.Tensor]]:
    """A timm CNN from scratch on the same batches (the DataModule the unified arms train from, augmented),
    class-balanced cross-entropy, AdamW with a linear warm-up and a cosine over the CPU budget; validation after
    every epoch (and when the budget ends), the best state by validation macro-F1 kept."""
    import timm

    from idrecog.data.datamodule import IdDataModule
    from idrecog.tasks.classification import balanced_class_weights

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    clock = Clock()
    dm = IdDataModule(
        root=str(out / "data"),
        img_size=tuple(args.img_size),
        batch_size=args.batch,
        augment=True,
        num_workers=0,
        cache_images=True,
        preflight_cache_dir="",
        seed=args.seed,
    )
    dm.setup("fit")
    model = timm.create_model(args.cnn, pretrained=False, num_classes=len(CLASSES))
    weights = torch.tensor(balanced_class_weights([counts[c] for c in CLASSES]))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=args.cnn_lr
    )
    warm = 0.05

    def lr_at(frac: float) -> float:
        if frac < warm:
            return args.cnn_lr * max(frac / warm, 0.02)
        t = min(1.0, (frac - warm) / (1 - warm))
        return args.cnn_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))

    val_loader = eval_dm.val_dataloader()
    best: tuple[float, dict[str, torch.Tensor] | None] = (-1.0, None)
    steps, epochs, history = 0, 0, []
    done = False
    while not done:
        model.train()
        for batch in dm.train_dataloader():
            frac = clock.cpu() / cpu_budget
            if frac >= 1.0:
                done = True
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(frac)
            y = batch["targets"][TASK]
            keep = y >= 0
            loss = F.cross_entropy(model(batch["image"][keep]), y[keep], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        else:
            epochs += 1
        model.eval()
        f1 = scores(*predict(model, val_loader))["f1_macro"]
        history.append({"epoch": epochs, "step": steps, "cpu_s": clock.cpu(), "val_f1_macro": f1})
        log(
            f"control: step {steps} ({epochs} full epochs), {clock.cpu():.0f} of {cpu_budget:.0f} CPU-s, "
            f"val macro-F1 {f1:.3f}"
        )
        if f1 > best[0]:
            best = (f1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if clock.cpu() >= cpu_budget:
            done = True
    model.load_state_dict(best[1])  # type: ignore[arg-type]
    model.eval()
    record = {
        "arm": "control",
        "model": args.cnn,
        "cpu_s": clock.cpu(),
        "cpu_budget_s": cpu_budget,
        "wall_s": clock.wall(),
        "steps": steps,
        "epochs": epochs,
        "best_val_f1_macro": best[0],
        "class_weights": weights.tolist(),
        "history": history,
    }
    return record, model


# ---------------------------------------------------------------------------------------------- report
def render(state: dict[str, Any]) -> str:
    s = state["setup"]
    lines = [
        f"# Small imbalanced data ({s['date']})",
        "",
        f"`{s['command']}` on {s['machine']}; torch threads {s['threads']}, seed {s['seed']}.",
        "",
        f"Task `{TASK}` ({', '.join(CLASSES)}), cut from the synthetic benchmark at {s['img_size'][0]} x "
        f"{s['img_size'][1]}: "
        + "; ".join(
            f"{k} {sum(v.values())} ({' / '.join(str(n) for n in v.values())})"
            for k, v in s["splits"].items()
        )
        + ".",
        "",
    ]
    p = state.get("pretrain")
    if p:
        lines += [
            f"MAE pretraining: {p['steps']} steps x {s['pretrain_batch']} images ({p['passes']:.1f} passes over "
            f"{p['distinct_images']} images: "
            + (
                "the train images"
                if not s.get("pretrain_unlabelled")
                else f"the train images and {s['pretrain_unlabelled']} unlabelled captures in no split"
            )
            + f"), {p['cpu_s']:.0f} CPU-s / {p['wall_s']:.0f} s wall, loss {_fmt(p['loss_first'])} -> "
            f"{_fmt(p['loss_last'])}.",
            "",
        ]
    lines += [
        "| arm | CPU-s | wall s | steps | best val macro-F1 | test macro-F1 | test accuracy | test recall "
        + " / ".join(CLASSES)
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in state["runs"]:
        t = r.get("test") or {}
        recall = " / ".join(_fmt(v, 2) for v in (t.get("recall") or {}).values())
        lines.append(
            f"| {r['label']} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} | {r['steps']} | {_fmt(r['best_val_f1_macro'])} | "
            f"**{_fmt(t.get('f1_macro'))}** | {_fmt(t.get('accuracy'))} | {recall} |"
        )
    v = state.get("verdict")
    if v:
        lines += [
            "",
            f"recipe - control, test macro-F1: {v['margin']:+.3f} (paired bootstrap over the {v['n_test']} test "
            f"samples: 95 % interval {v['low']:+.3f} .. {v['high']:+.3f}, recipe ahead in {v['ahead']:.0%} of "
            f"resamples); verdict: the recipe {'beats' if v['beats'] else 'does NOT beat'} the control.",
        ]
    for n in state["notes"]:
        lines.append(f"\nnote: {n}")
    return "\n".join(lines) + "\n"


def _fmt(v: Any, nd: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.{nd}f}"


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy > 0.5 * (os.cpu_count() or 1) and not args.smoke:
        log(
            f"warning: load average {busy:.1f} on {os.cpu_count()} cores: other jobs share the machine, so CPU "
            "seconds buy less work and the arms may not get the same work for the same budget"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = pool_dir(args, out)
    state: dict[str, Any] = {"runs": [], "notes": [], "pretrain": None, "verdict": None}
    state["setup"] = {
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.small_data " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "threads": args.threads,
        "seed": args.seed,
        "img_size": args.img_size,
        "pretrain_batch": args.pretrain_batch,
        "pretrain_unlabelled": args.pretrain_unlabelled,
        "cnn": args.cnn,
    }
    ensure_dataset(
        pool, args.pool_size, 0, tuple(args.img_size), workers=2 if not args.smoke else 1, progress=False
    )
    splits = cut_dataset(pool, out / "data", args)
    state["setup"]["splits"] = splits
    log(f"dataset {out / 'data'}: " + ", ".join(f"{k} {v}" for k, v in splits.items()))
    eval_dm = eval_datamodule(out / "data", args)
    test_loader = eval_dm.test_dataloader()
    model_over = model_overrides(args)
    preds: dict[str, np.ndarray] = {}
    y_test: np.ndarray | None = None

    def score(record: dict[str, Any], label: str, logits_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        nonlocal y_test
        y, pred = predict(logits_of, test_loader)
        y_test = y
        preds[record["arm"]] = pred
        record["label"] = label
        record["test"] = scores(y, pred)
        state["runs"].append(record)
        log(
            f"{record['arm']}: test macro-F1 {record['test']['f1_macro']:.3f}, accuracy {record['test']['accuracy']:.3f}"
        )
        write_results(out, state, render(state))

    # the recipe and scratch fine-tunes: model_over and their number of epochs
    finetune = merged(
        model_over, {"trainer": {"max_epochs": args.finetune_epochs}} if args.finetune_epochs else {}
    )
    if "default" in args.arms:
        over = merged(model_over, {"model": {"init_args": {"task_options": None}}})
        rec = fit_unified("default", [UNIFIED_CONFIG], over, out, args)
        score(rec, "unified.yaml as it is (scratch, plain CE, 3 epochs)", unified_logits(rec["checkpoint"]))
    recipe_cpu = None
    if "recipe" in args.arms:
        enc: dict[str, Any] = {}
        pre_cpu = 0.0
        if args.pretrained_file:
            enc["pretrained_file"] = str(args.pretrained_file)
            how = f"local timm file {args.pretrained_file}"
        else:
            ckpt, state["pretrain"] = pretrain(out, args)
            pre_cpu = state["pretrain"]["cpu_s"]
            enc["init_from"] = str(ckpt)
            how = "own MAE"
        over = merged(finetune, {"model": {"init_args": {"encoder": {"init_args": enc}}}})
        rec = fit_unified("recipe", [UNIFIED_CONFIG, OVERLAY], over, out, args)
        rec["pretrain_cpu_s"] = pre_cpu
        rec["finetune_cpu_s"] = rec["cpu_s"]
        rec["cpu_s"] += pre_cpu
        rec["wall_s"] += state["pretrain"]["wall_s"] if state["pretrain"] else 0.0
        recipe_cpu = rec["cpu_s"]
        score(rec, f"recipe: {how} + small_data.yaml (class_weights auto)", unified_logits(rec["checkpoint"]))
    if "scratch" in args.arms:
        rec = fit_unified("scratch", [UNIFIED_CONFIG, OVERLAY], finetune, out, args)
        score(rec, "small_data.yaml from scratch (no pretraining)", unified_logits(rec["checkpoint"]))
    if "control" in args.arms:
        budget = args.control_cpu_s or recipe_cpu
        if budget is None:
            raise SystemExit("--arms control without recipe needs --control-cpu-s")
        rec, model = train_control(out, args, budget, splits["train"], eval_dm)
        score(rec, f"control: {args.cnn} from scratch, balanced CE, same CPU", model)
    if "recipe" in preds and "control" in preds and y_test is not None:
        r = next(x for x in state["runs"] if x["arm"] == "recipe")["test"]["f1_macro"]
        c = next(x for x in state["runs"] if x["arm"] == "control")["test"]["f1_macro"]
        boot = paired_bootstrap(y_test, preds["recipe"], preds["control"], args.bootstrap, args.seed)
        state["verdict"] = {"margin": r - c, "beats": r > c, "n_test": len(y_test), **boot}
    state["setup"]["total_wall_s"] = time.monotonic() - T0
    js, md = write_results(out, state, render(state))
    print(render(state), flush=True)
    log(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
