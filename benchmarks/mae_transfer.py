"""MAE transfer: fine-tune the unified model from MAE-pretrained encoder weights and from scratch, same budget.

    python3 -m benchmarks.mae_transfer --time-budget 285      # GPU (defaults sized for ~300 s) -> runs/mae_transfer
    .venv/bin/python -m benchmarks.mae_transfer --smoke       # CPU check, tiny, ~1.5 min -> runs/mae_transfer_smoke

1. **Pretrain.** MAE-pretrains the encoder of the default unified config (the ``model.init_args.encoder`` block of
   ``lightning_configs/unified.yaml``: ViT-Tiny, depth 4, 160 x 256) with ``MAEPretrainModule`` and the settings
   of ``idrecog/configs/pretrain_mae.yaml`` (mask 0.75, 128 x 2 decoder, norm_pix_loss, AdamW (0.9, 0.95),
   lr = 1.5e-4 x batch / 256, warm-up + cosine), built by the same LightningCLI from a config derived from that
   file (written to ``OUT/configs/pretrain.yaml``), on the images of the dataset's train split (labels ignored),
   for ``--pretrain-seconds`` of ``Trainer(max_time=...)``. The cosine schedule is sized to the time: after a few
   steps the step rate is measured and ``max_steps`` and the schedule's length (warm-up ``--pretrain-warmup`` of
   it) are set to what fits. ``--pretrain-ckpt PATH`` skips this phase.

   Data (``--pretrain-loader``): ``tensor`` (default) decodes the train images once into a uint8 tensor held on
   the accelerator and draws the crops there (the same ``RandomResizedCrop`` ranges as ``PretrainDataModule``:
   area 0.6-1.0, width/height 1.3-1.9, bilinear; brightness/contrast/saturation jitter 0.2; hue jitter left
   out), so a few CPU cores do not starve the GPU; ``datamodule`` uses ``PretrainDataModule(source=manifest)``
   with DataLoader workers, exactly as ``idrecog pretrain --data.source=manifest`` would.

2. **Fine-tune.** The unified model with the settings of ``lightning_configs/unified.yaml`` (config derived from
   it: ``OUT/configs/<run>.yaml``, run by ``idrecog fit``'s own LightningCLI, ``idrecog.cli.train.build_cli``) on a
   fixed labelled subset of the train split (``--label-fraction`` of it, chosen by ``data.limit_train_samples``
   with ``data.seed = --subset-seed``: the same samples, in the same order, for every run), once from the MAE
   weights (``model.encoder.init_args.init_from=<pretrain checkpoint>``, the hand-off; checked weight for weight)
   and once from scratch, for each seed (``seed_everything``: initialisation, augmentation), the same number of
   optimiser steps each. Changed from the file: no validation during training and no checkpoints or prediction
   writer (validation runs once at the end on the full val split), ``max_steps`` instead of ``max_epochs``,
   persistent DataLoader workers, augmentation on, and, for runs under 250 steps, warm-up min(50, steps // 5).
   ``--finetune-steps auto`` (default) first times a short calibration fine-tune and picks the step count that
   fits ``--finetune-seconds`` per run (and the time left).

3. **Report.** A Markdown table (every task's primary metric and ``val/score``, MAE vs scratch, per seed and
   mean), the MAE pretraining loss at start and end and its images/s, written with everything else to
   ``OUT/results.json`` and ``OUT/results.md``.

Defaults: GPU: bf16-mixed, 4 DataLoader workers, 2 torch threads, pretraining batch 512 for up to 150 s,
fine-tunes sized to ``--finetune-seconds 30`` each, budget 300 s. CPU: 32-bit, 1 worker, 1 thread, batch 32.
``--smoke``: a generated 40 / 12-sample dataset at 64 x 96 (in ``OUT/smoke_data``), 20 labelled samples,
fine-tune batch 4, 12 s of pretraining and ~8 s fine-tunes, budget 170 s. ``--set KEY=VALUE`` changes a key of
the fine-tune config for both arms (e.g. ``model.init_args.encoder_lr_scale=0.5``); it is named in the output.

``--time-budget`` bounds the whole script (imports included): pretraining is shortened to leave room for the
fine-tunes, the fine-tune steps fit the time left, runs that cannot finish are skipped (a seed is dropped when
two seeds do not fit), and a watchdog writes the partial results and exits just before the deadline. Every
such change is listed under "notes" in the output.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the time budget counts from here (imports included)

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from collections import deque  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REPO,
    UNIFIED_CONFIG,
    Budget,
    StepTimer,
    bare_argv,
    derive_config,
    ensure_dataset,
    exit_at,
    load_yaml,
    loader_settings,
    merged,
    quiet_trainer,
    resolve_device,
    unified_cli,
    validate_once,
    write_results,
    write_yaml,
)

ARMS = ("mae", "scratch")
OUT_DEFAULT = "runs/mae_transfer"

# Everything the report needs, filled in as the script goes (the watchdog prints whatever is there).
STATE: dict[str, Any] = {"notes": [], "runs": [], "pretrain": None, "calibration": None, "setup": {}}
_REPORT_LOCK = threading.Lock()
_REPORTED = False


def note(msg: str) -> None:
    STATE["notes"].append(msg)
    print(f"[mae_transfer] NOTE: {msg}", flush=True)


def log(msg: str) -> None:
    print(f"[mae_transfer] {time.monotonic() - T0:6.1f}s {msg}", flush=True)


def run_trainer(
    args: argparse.Namespace, root: Path, max_steps: int, max_time_s: float, **extra: Any
) -> dict:
    """The trainer section of one time-boxed run's config: quiet, CSV logs under ``root``."""
    return quiet_trainer(
        args.accelerator,
        args.precision,
        root,
        max_time_s=max_time_s,
        csv_logs=True,
        max_steps=max_steps,
        val_check_interval=1.0,
        **extra,
    )


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="data/synthetic", help="dataset folder (tasks.yaml, train/val.jsonl)")
    p.add_argument("--out", default=OUT_DEFAULT, help="output folder (configs, logs, results.json)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32 on CPU")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default GPU 4, CPU 1)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="fine-tune batch (default: unified.yaml's, 32)"
    )
    p.add_argument("--pretrain-batch-size", type=int, default=None, help="default GPU 512, CPU 32")
    p.add_argument(
        "--pretrain-seconds", type=float, default=None, help="MAE fit max_time (default GPU 150, CPU 120)"
    )
    p.add_argument("--pretrain-ckpt", default=None, help="an MAE checkpoint: skip pretraining")
    p.add_argument("--pretrain-loader", default="tensor", choices=["tensor", "datamodule"])
    p.add_argument("--pretrain-warmup", type=float, default=0.05, help="warm-up, fraction of pretrain steps")
    p.add_argument(
        "--pretrain-base-lr",
        type=float,
        default=None,
        help="MAE base_lr (lr = base_lr x batch / 256); default: config's",
    )
    p.add_argument("--label-fraction", type=float, default=0.1, help="labelled share of the train split")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the labelled subset (data.seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--finetune-steps", default="auto", help="optimiser steps per fine-tune, or 'auto'")
    p.add_argument(
        "--finetune-seconds",
        type=float,
        default=None,
        help="target wall seconds per fine-tune (auto steps; pretraining leaves room for them); default GPU 30",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default GPU 2, CPU 1)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole script (GPU 300)")
    p.add_argument("--unified-config", default=str(UNIFIED_CONFIG))
    p.add_argument("--pretrain-config", default=str(REPO / "idrecog/configs/pretrain_mae.yaml"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the fine-tune config (both arms), e.g. model.init_args.encoder_lr_scale=0.5",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny generated dataset (40 train / 12 val at 64 x 96), 12 s pretraining, ~8 s fine-tunes",
    )
    args = p.parse_args(argv)
    if args.finetune_steps != "auto":
        try:
            args.finetune_steps = int(args.finetune_steps)
        except ValueError:
            p.error(f"--finetune-steps must be an integer or 'auto', got {args.finetune_steps!r}")
        if args.finetune_steps < 1:
            p.error("--finetune-steps must be >= 1")
    if not 0 < args.label_fraction <= 1:
        p.error("--label-fraction must be in (0, 1]")
    return args


def resolve_defaults(args: argparse.Namespace) -> None:
    args.accelerator, args.precision = resolve_device(args.accelerator, args.precision)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--accelerator gpu: no CUDA device")
    gpu = args.accelerator == "gpu"
    s = args.smoke

    def pick(value: Any, smoke: Any, on_gpu: Any, on_cpu: Any) -> Any:
        if value is not None:
            return value
        return smoke if s else on_gpu if gpu else on_cpu

    args.num_workers = pick(args.num_workers, 0, 4, 1)
    args.batch_size = pick(args.batch_size, 4, None, None)  # None: the config's
    args.pretrain_batch_size = pick(args.pretrain_batch_size, 8, 512, 32)
    args.pretrain_seconds = pick(args.pretrain_seconds, 12.0, 150.0, 120.0)
    args.finetune_seconds = pick(args.finetune_seconds, 8.0, 30.0, 120.0)
    args.threads = pick(args.threads, 1, 2, 1)
    args.time_budget = pick(args.time_budget, 170.0, 300.0, 900.0)
    if s:
        args.label_fraction = 0.5  # of 40 generated train samples
        args.img_size = (64, 96)
    else:
        args.img_size = None  # the config's


# ---------------------------------------------------------------------------------------------- report
def _fmt(v: float | None, nd: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def summarise() -> dict[str, Any]:
    """Per task and arm: the primary metric per seed and mean; val/score likewise; the verdict."""
    runs = [r for r in STATE["runs"] if r.get("metrics")]
    tasks = STATE["setup"].get("tasks") or []
    seeds = sorted({r["seed"] for r in runs})
    out: dict[str, Any] = {"seeds": seeds, "tasks": {}, "score": {}}

    def get(arm: str, seed: int, key: str) -> float | None:
        for r in runs:
            if r["arm"] == arm and r["seed"] == seed:
                v = r["metrics"].get(key)
                return None if v is None else float(v)
        return None

    def block(key: str) -> dict[str, Any]:
        b: dict[str, Any] = {}
        for arm in ARMS:
            per = {s: get(arm, s, key) for s in seeds}
            vals = [v for v in per.values() if v is not None]
            b[arm] = {"per_seed": per, "mean": statistics.mean(vals) if vals else None}
        # the mean over the seeds both arms have (a paired comparison)
        both = [
            s
            for s in seeds
            if b["mae"]["per_seed"][s] is not None and b["scratch"]["per_seed"][s] is not None
        ]
        b["paired_seeds"] = both
        if both:
            b["paired_mean"] = {
                arm: statistics.mean(b[arm]["per_seed"][s] for s in both)
                for arm in ARMS  # type: ignore[misc]
            }
        return b

    for t in tasks:
        key = f"val/{t['name']}/{t['metric']}"
        out["tasks"][t["name"]] = {
            **block(key),
            "metric": t["metric"],
            "higher_is_better": t["higher_is_better"],
        }
    out["score"] = block("val/score")
    pm = out["score"].get("paired_mean")
    if pm:
        out["verdict"] = {
            "mae_minus_scratch": pm["mae"] - pm["scratch"],
            "target_met": pm["mae"] > pm["scratch"],
            "paired_seeds": out["score"]["paired_seeds"],
        }
    return out


def render(summary: dict[str, Any]) -> str:
    s = STATE["setup"]
    lines = [
        "## MAE transfer: the unified model fine-tuned from MAE weights vs from scratch",
        "",
        f"{s.get('when', '')}; {s.get('device', '')}; torch {s.get('torch', '')}, lightning "
        f"{s.get('lightning', '')}; precision {s.get('precision', '')}",
        f"encoder: {s.get('encoder', '')}",
        f"data: {s.get('data', '')} (img {s.get('img_size', '')}); labelled subset: {s.get('n_labelled', '?')} of "
        f"{s.get('n_train', '?')} train samples (fraction {s.get('label_fraction', '?')}, subset seed "
        f"{s.get('subset_seed', '?')}, the same for every run); validation: the full val split "
        f"({s.get('n_val', '?')} samples)",
    ]
    steps = STATE.get("finetune_steps")
    if steps is not None:
        lines.append(
            f"fine-tune: {steps} optimiser steps per run (warm-up {STATE.get('finetune_warmup', '?')}), batch "
            f"{s.get('batch_size', '?')}, settings of {s.get('unified_config', 'unified.yaml')}"
            + (f" with {', '.join(s['overrides'])}" if s.get("overrides") else "")
            + f"; seeds {STATE.get('seeds_planned', summary['seeds'])}"
        )
    lines.append("")
    seeds = summary["seeds"]
    head = "| task | metric |"
    rule = "|---|---|"
    for sd in seeds:
        head += f" MAE s{sd} | scratch s{sd} |"
        rule += "---:|---:|"
    head += " MAE mean | scratch mean | MAE - scratch | better |"
    rule += "---:|---:|---:|---|"
    lines += [head, rule]

    def row(name: str, metric: str, b: dict[str, Any], hib: bool) -> str:
        r = f"| {name} | {metric} |"
        for sd in seeds:
            r += f" {_fmt(b['mae']['per_seed'].get(sd))} | {_fmt(b['scratch']['per_seed'].get(sd))} |"
        pm = b.get("paired_mean")
        mm, ms = (pm["mae"], pm["scratch"]) if pm else (b["mae"]["mean"], b["scratch"]["mean"])
        if pm and mm is not None and ms is not None:
            d = mm - ms
            better = "tie" if d == 0 else ("MAE" if (d > 0) == hib else "scratch")
            r += f" {_fmt(mm)} | {_fmt(ms)} | {d:+.4f} | {better} |"
        else:
            r += f" {_fmt(mm)} | {_fmt(ms)} | n/a | n/a |"
        return r

    for name, b in summary["tasks"].items():
        metric = b["metric"] + ("" if b["higher_is_better"] else " (lower is better)")
        lines.append(row(name, metric, b, b["higher_is_better"]))
    if summary["score"]:
        lines.append(row("**val/score**", "mean task score", summary["score"], True))
    lines.append("")
    lines.append(
        "Means are over the seeds where both arms finished (paired); per-seed columns show every run."
    )
    pre = STATE.get("pretrain")
    if pre:
        if pre.get("from_ckpt"):
            lines.append(f"MAE pretraining: skipped, weights from {pre['ckpt']}")
        else:
            lines.append(
                f"MAE pretraining ({pre.get('loader')} loader, batch {pre.get('batch_size')}, lr "
                f"{pre.get('lr') or 0:.3g}): {pre.get('steps')} steps, {pre.get('images', 0) / 1e3:.1f} k images "
                f"({_fmt(pre.get('epochs'), 1)} passes over {pre.get('n_images')} train images) in "
                f"{_fmt(pre.get('fit_seconds'), 1)} s of fit (max_time {_fmt(pre.get('max_time_s'), 0)} s); "
                f"**{_fmt(pre.get('images_per_s'), 0)} images/s** (steady, after step {pre.get('rate_from_step')})"
            )
            lines.append(
                f"MAE loss: train {_fmt(pre.get('train_loss_start'))} -> {_fmt(pre.get('train_loss_end'))} "
                f"(mean of the first / last {pre.get('loss_window')} steps); fixed-mask val loss on "
                f"{pre.get('n_val_images')} val images {_fmt(pre.get('val_loss_start'))} -> "
                f"{_fmt(pre.get('val_loss_end'))}"
            )
    cal = STATE.get("calibration")
    if cal:
        lines.append(
            f"fine-tune step count: auto, from a {cal['steps']}-step calibration run ({_fmt(cal['steps_per_s'], 2)} "
            f"steps/s, {_fmt(cal['overhead_s'], 1)} s start-up, {_fmt(cal['val_s'], 1)} s validation) for "
            f"{_fmt(cal['target_s'], 0)} s per run"
        )
    for r in STATE["runs"]:
        ho = ""
        if r["arm"] == "mae":
            ok = r.get("handoff_ok")
            ho = ", hand-off " + ("unchecked" if ok is None else "verified" if ok else "NOT verified")
        lines.append(
            f"run {r['arm']} seed {r['seed']}: {r.get('steps_done', '?')} steps in {_fmt(r.get('fit_s'), 1)} s "
            f"+ validation {_fmt(r.get('val_s'), 1)} s{ho}"
            + ("" if r.get("metrics") else f" (no result: {r.get('error', 'unfinished')})")
        )
    v = summary.get("verdict")
    lines.append("")
    if v:
        lines.append(
            f"**target (MAE-initialised better on mean val/score at equal steps): "
            f"{'met' if v['target_met'] else 'NOT met'}** (MAE - scratch = {v['mae_minus_scratch']:+.4f}, "
            f"seeds {v['paired_seeds']})"
        )
    else:
        lines.append("**target: not evaluated** (no seed has both runs)")
    if STATE["notes"]:
        lines.append("")
        lines.append("notes:")
        lines += [f"- {n}" for n in STATE["notes"]]
    return "\n".join(lines) + "\n"


def report(out: Path, budget_hit: bool = False) -> None:
    """Print the table and write results.json / results.md (once)."""
    global _REPORTED
    with _REPORT_LOCK:
        if _REPORTED:
            return
        _REPORTED = True
        if budget_hit:
            STATE["notes"].append("TIME BUDGET HIT: the watchdog stopped the script; results are partial")
        summary = summarise()
        text = render(summary)
        STATE["summary"] = summary
        STATE["budget_hit"] = budget_hit
        STATE["elapsed_s"] = time.monotonic() - T0
        js, md = write_results(out, STATE, text)
        print("\n" + text, flush=True)
        print(f"[mae_transfer] wrote {js} and {md} ({STATE['elapsed_s']:.1f} s in all)", flush=True)


def expire(out: Path) -> None:
    """The watchdog's work at the deadline: write partial results unless the main thread already reported."""
    if not _REPORTED:
        print("[mae_transfer] time budget reached: writing partial results and exiting", flush=True)
        report(out, budget_hit=True)


# ---------------------------------------------------------------------------------------------- data
def count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for ln in f if ln.strip())


class DeviceAugmentedImages(L.LightningDataModule):
    """Unlabelled images for MAE held on the accelerator as uint8, with random resized crops and colour jitter
    drawn there (``on_after_batch_transfer``); the loader only yields indices."""

    def __init__(
        self,
        train_u8: torch.Tensor,
        val_images: torch.Tensor,
        batch_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        color_jitter: float,
    ) -> None:
        super().__init__()
        self.train_u8 = train_u8  # [N, 3, H, W] uint8, CPU until the first batch
        self.val_images = val_images  # [M, 3, H, W] normalised (eval transform)
        self.batch_size = int(batch_size)
        self.scale, self.ratio, self.cj = tuple(scale), tuple(ratio), float(color_jitter)
        self._dev: torch.Tensor | None = None

    def train_dataloader(self) -> DataLoader:
        n = len(self.train_u8)
        return DataLoader(
            range(n),  # type: ignore[arg-type]
            batch_size=min(self.batch_size, n),
            shuffle=True,
            drop_last=True,
            collate_fn=_index_batch,
        )

    def fixed_images(self, n: int = 4) -> torch.Tensor:
        return self.val_images[:n]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict) or "idx" not in batch:
            return batch
        dev = batch["idx"].device
        if self._dev is None or self._dev.device != dev:
            self._dev = self.train_u8.to(dev)
        return {"image": self.augment(self._dev[batch["idx"]])}

    def augment(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> normalised float [N, 3, H, W]: RandomResizedCrop (area ``scale``, width / height
        ``ratio``, bilinear, back to H x W) and brightness / contrast / saturation jitter, per image."""
        from idrecog.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        n, _, h0, w0 = u8.shape
        dev = u8.device
        x = u8.float().div_(255.0)

        def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return torch.empty(n, *shape, device=dev).uniform_(lo, hi)

        area = float(h0 * w0)
        s = uniform(*self.scale)
        r = uniform(math.log(self.ratio[0]), math.log(self.ratio[1])).exp()
        cw = (s * area * r).sqrt().clamp(max=w0)
        ch = (s * area / r).sqrt().clamp(max=h0)
        x0 = torch.rand(n, device=dev) * (w0 - cw)
        y0 = torch.rand(n, device=dev) * (h0 - ch)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0] = cw / w0
        theta[:, 0, 2] = (2 * x0 + cw) / w0 - 1
        theta[:, 1, 1] = ch / h0
        theta[:, 1, 2] = (2 * y0 + ch) / h0 - 1
        grid = F.affine_grid(theta, [n, 3, h0, w0], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.cj > 0:
            lo, hi = 1 - self.cj, 1 + self.cj
            x = (x * uniform(lo, hi, 1, 1, 1)).clamp_(0, 1)  # brightness
            wts = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
            m = (x * wts).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            x = ((x - m) * uniform(lo, hi, 1, 1, 1) + m).clamp_(0, 1)  # contrast
            g = (x * wts).sum(1, keepdim=True)
            x = ((x - g) * uniform(lo, hi, 1, 1, 1) + g).clamp_(0, 1)  # saturation
        mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
        return (x - mean) / std


def _index_batch(idx: list[int]) -> dict[str, torch.Tensor]:
    return {"idx": torch.tensor(idx, dtype=torch.long)}


def decode_images(files: list[Path], img_size: tuple[int, int], workers: int) -> Any:
    """Image files -> uint8 [N, 3, H, W] (resized to img_size), decoded by ``workers`` processes."""
    from torchvision.transforms import v2

    from idrecog.data.pretrain import ImageFilesDataset, collate_images

    tf = v2.Compose([v2.ToImage(), v2.Resize(list(img_size), antialias=True)])
    ds = ImageFilesDataset(files, tf)
    loader = DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=collate_images)
    return torch.cat([b["image"].as_subclass(torch.Tensor) for b in loader])


# ---------------------------------------------------------------------------------------------- callbacks
def make_pretrain_monitor(deadline: float, warmup_frac: float, mark_step: int, loss_window: int) -> Any:
    class PretrainMonitor(Callback):
        """Losses of the first / last steps; images/s after ``mark_step``; sizes max_steps and the cosine
        schedule to the time left once the step rate is known."""

        def __init__(self) -> None:
            self.first: list[Any] = []
            self.last: deque[Any] = deque(maxlen=loss_window)
            self.t_mark: float | None = None
            self.step_mark = 0
            self.calibrated = False
            self.total: int | None = None
            self.t_end: float | None = None
            self.step_end = 0

        def _sync(self, pl_module: Any) -> None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None:
                loss = loss.detach()
                if len(self.first) < loss_window:
                    self.first.append(loss)
                self.last.append(loss)
            step = trainer.global_step
            if self.t_mark is None and step >= mark_step:
                self._sync(pl_module)
                self.t_mark, self.step_mark = time.monotonic(), step
                return
            if self.t_mark is None or self.calibrated:
                return
            now = time.monotonic()
            # size the schedule once the rate is measured over >= 3 steps and >= 5% of the time
            span = min(2.0, 0.05 * max(1.0, deadline - self.t_mark))
            if step - self.step_mark >= 3 and now - self.t_mark >= span:
                self._sync(pl_module)
                now = time.monotonic()
                rate = (step - self.step_mark) / (now - self.t_mark)
                total = max(step + 1, step + int(rate * (deadline - now) * 0.97))
                trainer.fit_loop.epoch_loop.max_steps = total
                warm = max(1, round(warmup_frac * total))
                for cfg in trainer.lr_scheduler_configs:
                    for lam in getattr(cfg.scheduler, "lr_lambdas", []):
                        if hasattr(lam, "total") and hasattr(lam, "warmup"):
                            lam.total, lam.warmup = float(total), int(warm)
                self.calibrated, self.total = True, total
                log(
                    f"pretrain: {rate:.2f} steps/s at step {step}: max_steps -> {total}, warm-up {warm}, "
                    "cosine to the end"
                )

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._sync(pl_module)
            self.t_end, self.step_end = time.monotonic(), trainer.global_step

    return PretrainMonitor()


# ---------------------------------------------------------------------------------------------- phases
def encoder_block(args: argparse.Namespace, unified: dict[str, Any]) -> dict[str, Any]:
    enc = copy.deepcopy(unified["model"]["init_args"]["encoder"])
    enc.setdefault("init_args", {})["img_size"] = list(args.img_size)
    enc["init_args"]["init_from"] = None
    return enc


def fixed_mask_loss(module: Any, imgs: Any, device: Any, bf16: bool) -> float:
    module.to(device).eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        gen = torch.Generator(device=device).manual_seed(1000)
        loss, _, _ = module.model(imgs.to(device), generator=gen)
    module.train()
    return float(loss)


def pretrain(
    args: argparse.Namespace, out: Path, budget: Budget, unified: dict[str, Any], n_runs: int
) -> Path:
    from lightning.pytorch.cli import LightningCLI

    from idrecog.data.pretrain import PretrainDataModule
    from idrecog.lit.mae import MAEPretrainModule

    gpu = args.accelerator == "gpu"
    # leave room for the fine-tunes (and the calibration run when the step count is auto)
    reserve = n_runs * args.finetune_seconds + (
        0.6 * args.finetune_seconds if args.finetune_steps == "auto" else 0
    )
    reserve += 8.0 if args.smoke else 10.0  # pretraining start-up (decode, CLI), checkpoint, report
    avail = budget.left() - reserve
    seconds = float(args.pretrain_seconds)
    if avail < seconds:
        seconds = max(5.0, avail)
        note(
            f"pretraining shortened from {args.pretrain_seconds:.0f} s to {seconds:.0f} s to leave "
            f"{reserve:.0f} s for {n_runs} fine-tunes in the {args.time_budget:.0f} s budget"
        )
    model_over: dict[str, Any] = {
        "encoder": encoder_block(args, unified),
        # the lr stays near 0 until the step rate is known (a second or two), then PretrainMonitor sets the real
        # warm-up (--pretrain-warmup of the steps that fit) and the cosine's length
        "warmup_steps": 10**6,
    }
    if args.pretrain_base_lr is not None:
        model_over["base_lr"] = float(args.pretrain_base_lr)
    pdir = out / "pretrain"
    trainer_over = run_trainer(
        args,
        pdir,
        max_steps=10**7,  # sized to the time once the step rate is known (PretrainMonitor)
        max_time_s=seconds,
        log_every_n_steps=50 if gpu else 5,
        check_val_every_n_epoch=1,
        callbacks=[
            {
                "class_path": "idrecog.callbacks.MAEReconstructionImages",
                "init_args": {"every_n_steps": 0, "num_images": 4},
            }
        ],
    )
    data_over = {
        "source": "manifest",
        "path": str(args.data),
        "img_size": list(args.img_size),
        "batch_size": args.pretrain_batch_size,
        **loader_settings(args.num_workers, args.accelerator),
        "val_samples": 64,
    }
    over = {"seed_everything": 0, "model": model_over, "trainer": trainer_over, "data": data_over}
    cfg_path = derive_config(out / "configs" / "pretrain.yaml", over, base=args.pretrain_config)
    with bare_argv():
        cli = LightningCLI(
            MAEPretrainModule,
            PretrainDataModule,
            args=["--config", str(cfg_path)],
            run=False,
            save_config_kwargs={"overwrite": True},
        )
    model, pdm, trainer = cli.model, cli.datamodule, cli.trainer
    pdm.setup()
    train_files = list(pdm.train_dataset.files)
    val_imgs = pdm.fixed_images(64)
    if args.pretrain_loader == "tensor":
        t = time.monotonic()
        u8 = decode_images(train_files, tuple(args.img_size), args.num_workers)
        log(
            f"pretrain: decoded {len(u8)} train images ({u8.numel() / 1e6:.0f} MB uint8) in {time.monotonic() - t:.1f} s"
        )
        dm = DeviceAugmentedImages(
            u8, val_imgs, args.pretrain_batch_size, pdm.scale, pdm.ratio, pdm.color_jitter
        )
    else:
        dm = pdm
    n_images = len(train_files)
    bs = min(args.pretrain_batch_size, n_images)
    if bs < args.pretrain_batch_size:
        note(f"pretraining batch cut to {bs} (only {n_images} train images)")
        dm.batch_size = bs
    device = torch.device("cuda") if gpu else torch.device("cpu")
    bf16 = args.precision.startswith("bf16")
    val_start = fixed_mask_loss(model, val_imgs, device, bf16)
    mark_step = 2 if args.smoke or not gpu else 10
    fit_seconds_left = max(1.0, seconds)
    window = 10 if not args.smoke else 3
    t_fit = time.monotonic()
    mon = make_pretrain_monitor(t_fit + fit_seconds_left, args.pretrain_warmup, mark_step, window)
    trainer.callbacks.append(mon)
    log(
        f"pretrain: fit for at most {seconds:.0f} s, batch {bs}, {n_images} images, loader {args.pretrain_loader}"
    )
    trainer.fit(model, datamodule=dm)
    fit_s = time.monotonic() - t_fit
    ckpt = out / "pretrain" / "mae_last.ckpt"
    trainer.save_checkpoint(str(ckpt))
    val_end = fixed_mask_loss(model, val_imgs, device, bf16)
    try:  # one reconstruction picture of the fixed val images (best effort)
        cb = next(c for c in trainer.callbacks if type(c).__name__ == "MAEReconstructionImages")
        model.to(device)
        picture = cb.draw(trainer, model)
        model.cpu()
    except Exception as e:
        picture = f"not drawn: {e}"
    steps = int(mon.step_end)
    rate_steps = steps - mon.step_mark
    dt = (mon.t_end or time.monotonic()) - (mon.t_mark or t_fit)
    ips = rate_steps * bs / dt if rate_steps > 0 and dt > 0 else None
    first = float(torch.stack(mon.first).float().mean()) if mon.first else None
    last = float(torch.stack(list(mon.last)).float().mean()) if mon.last else None
    STATE["pretrain"] = {
        "loader": args.pretrain_loader,
        "config": str(cfg_path),
        "ckpt": str(ckpt),
        "batch_size": bs,
        "lr": getattr(model, "lr", None),
        "steps": steps,
        "images": steps * bs,
        "n_images": n_images,
        "epochs": steps * bs / n_images,
        "fit_seconds": fit_s,
        "max_time_s": seconds,
        "scheduled_steps": mon.total,
        "images_per_s": ips,
        "rate_from_step": mon.step_mark,
        "train_loss_start": first,
        "train_loss_end": last,
        "loss_window": window,
        "val_loss_start": val_start,
        "val_loss_end": val_end,
        "n_val_images": len(val_imgs),
        "picture": str(picture),
    }
    if mon.total and steps < mon.total - 1:
        note(
            f"pretraining stopped by max_time at step {steps} of the {mon.total} scheduled (cosine not finished)"
        )
    log(
        f"pretrain: {steps} steps in {fit_s:.1f} s, {ips or 0:.0f} images/s; loss {first} -> {last}; "
        f"fixed-mask val loss {val_start:.4f} -> {val_end:.4f}"
    )
    del cli, model, trainer, dm, pdm
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return ckpt


def finetune_config(
    args: argparse.Namespace,
    unified: dict[str, Any],
    name: str,
    out: Path,
    seed: int,
    steps: int,
    init_from: Path | None,
    max_time_s: float,
    n_labelled: int,
) -> Path:
    rdir = out / "finetune" / name
    enc = encoder_block(args, unified)
    enc["init_args"]["init_from"] = str(init_from) if init_from else None
    model_over: dict[str, Any] = {"encoder": enc}
    if steps < 250:
        warmup = unified["model"]["init_args"].get("warmup_steps", 50)
        model_over["warmup_steps"] = min(int(warmup), max(1, steps // 5))
    data_over: dict[str, Any] = {
        "root": str(args.data),
        "synthesize_if_missing": False,
        "img_size": list(args.img_size),
        "limit_train_samples": int(n_labelled),
        "seed": int(args.subset_seed),
        **loader_settings(args.num_workers, args.accelerator),
        # a few hundred labelled images seen many times: augmented, as in the recorded runs (the default
        # 3-epoch job of unified.yaml trains without augmentation)
        "augment": True,
    }
    if args.batch_size:
        data_over["batch_size"] = int(args.batch_size)
    over = {
        "seed_everything": int(seed),
        # validation runs once, after training
        "trainer": run_trainer(args, rdir, int(steps), max_time_s, log_every_n_steps=max(1, min(10, steps))),
        "model": {"init_args": model_over},
        "data": data_over,
    }
    cfg = merged(unified, over)
    for item in args.set:  # last: --set wins over the settings above
        apply_override(cfg, item)
    return write_yaml(cfg, out / "configs" / f"{name}.yaml")


def apply_override(cfg: dict[str, Any], item: str) -> None:
    """``a.b.c=VALUE`` (VALUE parsed as YAML) into the nested config dict."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. model.init_args.encoder_lr_scale=0.5")
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw)


def run_finetune(
    args: argparse.Namespace,
    unified: dict[str, Any],
    out: Path,
    name: str,
    seed: int,
    steps: int,
    init_from: Path | None,
    max_time_s: float,
    n_labelled: int,
    ref_weight: Any = None,
) -> dict[str, Any]:
    path = finetune_config(args, unified, name, out, seed, steps, init_from, max_time_s, n_labelled)
    t0 = time.perf_counter()  # the step timer's clock
    cli = unified_cli(["--config", str(path)])
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    res: dict[str, Any] = {"name": name, "seed": seed, "config": str(path), "steps_planned": steps}
    if ref_weight is not None:
        w = model.model.encoder.vit.patch_embed.proj.weight.detach().cpu()
        blk = model.model.encoder.vit.blocks[-1].mlp.fc2.weight.detach().cpu()
        res["handoff_ok"] = bool(torch.equal(w, ref_weight[0]) and torch.equal(blk, ref_weight[1]))
    timer = StepTimer()  # UnifiedModule syncs each step (its finite-loss check reads the loss): no sync here
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=dm)
    t_fit = time.perf_counter()
    res["steps_done"] = int(trainer.global_step)
    res["fit_s"] = t_fit - t0
    res["first_step_s"] = (timer.ends[0] - t0) if timer.ends else None
    if len(timer.ends) >= 6:  # the rate after 3 warm-up steps, over 2 steps at least
        res["steps_per_s"] = timer.steps_per_s(skip=3)
    res["metrics"] = validate_once(trainer, model, dm)
    res["val_s"] = time.perf_counter() - t_fit
    res["n_train"] = len(dm.datasets["train"]) if "train" in dm.datasets else None
    res["n_val"] = len(dm.datasets["val"]) if "val" in dm.datasets else None
    res["batch_size"] = dm.batch_size
    res["warmup_steps"] = model.hparams.warmup_steps
    res["tasks"] = [
        {"name": t, "metric": tt.primary_metric, "higher_is_better": bool(tt.higher_is_better)}
        for t, tt in model.task_types.items()
    ]
    del cli, model, dm, trainer
    gc.collect()
    if args.accelerator == "gpu":
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------- main
def describe_encoder(block: dict[str, Any]) -> str:
    a = block.get("init_args") or {}
    size = "x".join(str(v) for v in a.get("img_size") or [])
    return f"{a.get('name')}, depth {a.get('depth') or 'full'}, {size} (model.init_args.encoder of the unified config)"


def handoff_reference(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two encoder tensors of a pretraining checkpoint (patch embedding, last block's fc2), to check that
    ``init_from`` put them into the unified model; None for a file that is not a Lightning checkpoint."""
    try:
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        vit = "model.encoder.vit."
        last = max(int(k[len(vit) :].split(".")[1]) for k in sd if k.startswith(vit + "blocks."))
        return sd[vit + "patch_embed.proj.weight"], sd[vit + f"blocks.{last}.mlp.fc2.weight"]
    except Exception as e:
        note(f"hand-off not checked weight for weight ({ckpt} is not an idrecog pretraining checkpoint: {e})")
        return None


def main(argv: list[str] | None = None) -> int:
    global _REPORTED
    _REPORTED = False
    STATE.update({"notes": [], "runs": [], "pretrain": None, "calibration": None, "setup": {}})
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # Lightning's info lines (devices, seeds, tips) and the data module's per-run summaries: once is enough
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.smoke and args.out == OUT_DEFAULT:
        args.out = OUT_DEFAULT + "_smoke"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    resolve_defaults(args)
    budget = Budget(args.time_budget, T0)
    watchdog = exit_at(budget.left() - 2.0, lambda: expire(out), 0)
    torch.set_num_threads(args.threads)
    if args.accelerator == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    unified = load_yaml(args.unified_config)
    if args.img_size is None:
        args.img_size = tuple(unified["data"].get("img_size") or (160, 256))
    if args.smoke:
        args.data = str(
            ensure_dataset(out / "smoke_data", 40, 12, args.img_size, workers=1, progress=False, say=log)
        )
        note(
            "smoke mode: a 40/12-sample dataset at 64x96, 20 labelled samples, batch 4, seconds-long runs: "
            "checks the script, not the claim"
        )
    data = Path(args.data)
    if not (data / "tasks.yaml").is_file() or not (data / "train.jsonl").is_file():
        raise SystemExit(
            f"{data}: no dataset (tasks.yaml, train.jsonl); generate it with `idrecog synth --out {data}`"
        )
    n_train = count_lines(data / "train.jsonl")
    n_val = count_lines(data / "val.jsonl")
    n_labelled = max(1, round(args.label_fraction * n_train))
    device = (
        torch.cuda.get_device_name(0)
        if args.accelerator == "gpu"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    STATE["setup"] = {
        "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": f"{device}, {os.cpu_count()} CPU cores visible, {args.num_workers} DataLoader workers",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "precision": args.precision,
        "data": str(data),
        "img_size": f"{args.img_size[0]}x{args.img_size[1]}",
        "n_train": n_train,
        "n_val": n_val,
        "n_labelled": n_labelled,
        "label_fraction": args.label_fraction,
        "subset_seed": args.subset_seed,
        "batch_size": args.batch_size or unified["data"].get("batch_size"),
        "unified_config": os.path.relpath(args.unified_config, REPO),
        "encoder": describe_encoder(encoder_block(args, unified)),
        "overrides": list(args.set),
        "pretrain_config": os.path.relpath(args.pretrain_config, REPO),
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "time_budget_s": args.time_budget,
    }
    log(
        f"{device}; budget {args.time_budget:.0f} s; labelled {n_labelled}/{n_train}, val {n_val}; seeds {args.seeds}"
    )
    try:
        run_phases(args, out, budget, unified, n_labelled)
    except Exception as e:  # report what was measured, then fail
        import traceback

        traceback.print_exc()
        note(f"stopped by an error: {type(e).__name__}: {e}")
        code = 1
    else:
        code = 0
    if watchdog is not None:  # the main thread reports; the exit code stays its own
        watchdog.cancel()
    report(out)
    return code


def run_phases(
    args: argparse.Namespace, out: Path, budget: Budget, unified: dict[str, Any], n_labelled: int
) -> None:
    """Pretraining (or the given checkpoint), the fine-tune step count, the fine-tunes; results go to STATE."""
    seeds = list(args.seeds)
    STATE["seeds_planned"] = list(seeds)

    # 1. pretraining
    if args.pretrain_ckpt:
        ckpt = Path(args.pretrain_ckpt)
        if not ckpt.is_file():
            raise SystemExit(f"--pretrain-ckpt {ckpt}: no such file")
        STATE["pretrain"] = {"from_ckpt": True, "ckpt": str(ckpt)}
    else:
        ckpt = pretrain(args, out, budget, unified, 2 * len(seeds))
    ref = handoff_reference(ckpt)

    # 2. fine-tune step count
    steps = args.finetune_steps
    final_margin = 4.0
    per_run_est: float | None = None
    if steps == "auto":
        cal_steps = 8 if args.smoke else 24
        log(f"calibration: a {cal_steps}-step scratch fine-tune to time the steps")
        cal = run_finetune(
            args, unified, out, "calibration", 1000, cal_steps, None, max(5.0, budget.left() - 10), n_labelled
        )
        rate = cal.get("steps_per_s") or (cal["steps_done"] / max(1e-6, cal["fit_s"]))
        overhead = (cal.get("first_step_s") or 0.0) + 1.0
        val_s = cal["val_s"]
        STATE["calibration"] = {
            "steps": cal["steps_done"],
            "steps_per_s": rate,
            "overhead_s": overhead,
            "val_s": val_s,
            "fit_s": cal["fit_s"],
        }
        n_runs = 2 * len(seeds)
        while True:
            per_run = (budget.left() - final_margin) / n_runs
            target = min(args.finetune_seconds, per_run)
            steps = int((target - overhead - val_s) * rate * 0.9)
            min_steps = 4 if args.smoke else 20
            if steps >= min_steps or len(seeds) == 1:
                break
            dropped = seeds.pop()
            n_runs = 2 * len(seeds)
            note(
                f"seed {dropped} dropped: {len(seeds) * 2 + 2} fine-tunes would get under {min_steps} steps each"
            )
        if steps < 1:
            steps = 1
            note("the time left allows almost no fine-tuning steps: 1 step per run")
        if target < args.finetune_seconds:
            note(
                f"fine-tunes sized to {target:.0f} s each (time left), not the {args.finetune_seconds:.0f} s asked"
            )
        STATE["calibration"]["target_s"] = target
        per_run_est = overhead + steps / rate + val_s
        log(f"fine-tune: {steps} steps per run ({rate:.2f} steps/s, ~{per_run_est:.0f} s per run)")
    STATE["finetune_steps"] = steps

    # 3. the fine-tunes, seed by seed (MAE, then scratch), so a cut budget still leaves paired seeds
    for seed in seeds:
        left = budget.left() - final_margin
        if per_run_est is not None and left < 2 * 0.8 * per_run_est:  # an unpaired run tells nothing
            note(f"seed {seed} skipped: {left:.0f} s left, ~{2 * per_run_est:.0f} s needed for its two runs")
            continue
        for arm in ARMS:
            name = f"{arm}_s{seed}"
            left = budget.left() - final_margin
            if per_run_est is not None and left < 0.8 * per_run_est:
                note(f"run {name} skipped: {left:.0f} s left, ~{per_run_est:.0f} s needed")
                STATE["runs"].append(
                    {"arm": arm, "seed": seed, "name": name, "error": "skipped (time budget)"}
                )
                continue
            val_guess = (STATE["calibration"] or {}).get("val_s") or 5.0
            guard = left - val_guess - 1.0
            if per_run_est is not None:
                guard = min(guard, 2.0 * per_run_est + 10.0)
            log(f"run {name}: {steps} steps (max_time {guard:.0f} s)")
            try:
                r = run_finetune(
                    args,
                    unified,
                    out,
                    name,
                    seed,
                    int(steps),
                    ckpt if arm == "mae" else None,
                    guard,
                    n_labelled,
                    ref if arm == "mae" else None,
                )
            except Exception as e:
                import traceback

                traceback.print_exc()
                r = {"name": name, "error": f"{type(e).__name__}: {e}"}
                note(f"run {name} failed: {type(e).__name__}: {e}")
            r.update(arm=arm, seed=seed)
            STATE["runs"].append(r)
            if r.get("tasks") and not STATE["setup"].get("tasks"):
                STATE["setup"]["tasks"] = r["tasks"]
                STATE["finetune_warmup"] = r.get("warmup_steps")
                STATE["setup"]["batch_size"] = r.get("batch_size")
            if r.get("steps_done") is not None and r["steps_done"] != steps:
                note(
                    f"run {name} stopped at {r['steps_done']} of {steps} steps (max_time guard): steps unequal"
                )
            if arm == "mae" and r.get("handoff_ok") is False:
                note(f"run {name}: the encoder weights after init_from differ from the MAE checkpoint")
            if r.get("metrics"):
                log(
                    f"run {name}: val/score {r['metrics'].get('val/score', float('nan')):.4f} ({r['fit_s']:.1f} s fit)"
                )
            if per_run_est is None and r.get("fit_s"):
                per_run_est = r["fit_s"] + r.get("val_s", 0.0)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip the interpreter's teardown of torch and Lightning (seconds on a busy machine): the budget includes it
    os._exit(code)
