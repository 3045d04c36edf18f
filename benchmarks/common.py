"""What the benchmark scripts share, one copy each: random batches in the DataModule's batch contract (also for
tests that measure the model alone), the time budget and its guard, a step timer, a quiet Trainer, run configs
derived from ``lightning_configs/unified.yaml``, the synthetic dataset they train on, and the options and model of
the CPU benchmarks."""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from idrecog.tasks.catalogue import TaskCatalogue
from idrecog.tasks.registry import create_task_type

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.cli import LightningCLI

    from idrecog.lit.unified import UnifiedModule

REPO = Path(__file__).resolve().parents[1]
UNIFIED_CONFIG = REPO / "lightning_configs" / "unified.yaml"


class PrecollatedBatches(torch.utils.data.Dataset):
    """A list of ready batches served as a dataset (use with ``batch_size=None``), to time or test the model
    without the data pipeline."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def _identity(x: dict) -> dict:
    return x


def precollated_loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    """A DataLoader that yields ``batches`` as they are (picklable, so worker processes work too)."""
    return torch.utils.data.DataLoader(PrecollatedBatches(batches), batch_size=None, collate_fn=_identity)


def _to(value: object, device: str | torch.device) -> object:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def make_random_batch(
    catalogue: TaskCatalogue,
    batch_size: int,
    img_size: tuple[int, int],
    *,
    present_prob: float = 1.0,
    num_angles: int = 2,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """A batch with random images and example labels for every catalogue task.

    images: [B, 3, H, W]; present: [B, T] with probability ``present_prob``; targets: each task type's
    ``example_target`` (its collated format), so plug-in types work too.
    """
    g = generator or torch.Generator().manual_seed(0)
    h, w = img_size
    b, t = batch_size, len(catalogue)
    present = torch.rand(b, t, generator=g) < present_prob
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    targets: dict[str, object] = {}
    for i, spec in enumerate(catalogue.tasks):
        # each task type makes its own example labels (any registered type, plug-ins included)
        target = create_task_type(spec).example_target(present[:, i].tolist(), (h, w), seed=seed + 97 * i)
        targets[spec.name] = _to(target, device)
    batch = {
        "image": torch.randn(b, 3, h, w, generator=g).to(device),
        "applies": torch.ones(b, t, dtype=torch.bool, device=device),
        "present": present.to(device),
        "targets": targets,
        "ids": [f"r{j}" for j in range(b)],
        "doc_type": [None] * b,
    }
    if any(s.uses_frames for s in catalogue.tasks):
        batch["assoc"] = {
            "flash": torch.randn(b, 3, h, w, generator=g).to(device),
            "angles": torch.randn(b, num_angles, 3, h, w, generator=g).to(device),
            "mask": torch.ones(b, 1 + num_angles, dtype=torch.bool, device=device),
        }
    return batch


def multipart_body(
    files: Sequence[tuple[str, str, bytes]],
    fields: dict[str, str] | None = None,
    boundary: str = "idrecogBoundary7",
) -> tuple[bytes, str]:
    """Encode a multipart/form-data body with the standard library (the load benchmark's client, tests).

    files: (field, filename, bytes) triples. Returns (body, content type).
    """
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, filename, data in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------------------------------------- time budget
class Budget:
    """A script's wall-clock budget counted from ``t0``, a ``time.monotonic()`` the script takes before its heavy
    imports (they count too). ``seconds=None``: no budget, ``left`` is infinite."""

    def __init__(self, seconds: float | None, t0: float) -> None:
        self.seconds = math.inf if seconds is None else float(seconds)
        self.t0 = t0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def exit_at(seconds: float, on_expire: Callable[[], None], exit_code: int) -> threading.Timer | None:
    """In ``seconds``: run ``on_expire`` (write what finished), then end the process with ``exit_code``, whatever
    the main thread is doing (a training step, a DataLoader join), so the script ends inside its budget.
    ``None`` (no timer) for an infinite time; cancel the returned timer once the results are written."""
    if not math.isfinite(seconds):
        return None

    def fire() -> None:
        try:
            on_expire()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)

    timer = threading.Timer(max(0.0, seconds), fire)
    timer.daemon = True
    timer.start()
    return timer


def hms(seconds: float) -> str:
    """Lightning's max_time string, DD:HH:MM:SS (whole seconds, at least 1)."""
    s = max(1, int(seconds))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def write_results(out: Path, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """``out/results.json`` (everything) and ``out/results.md`` (the tables) of a run."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    js.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    md.write_text(markdown if markdown.endswith("\n") else markdown + "\n", encoding="utf-8")
    return js, md


# ---------------------------------------------------------------------------------------------- step timer
def intervals(times: Sequence[float]) -> list[float]:
    """The gaps between consecutive times."""
    return [b - a for a, b in itertools.pairwise(times)]


class StepTimer(Callback):
    """A fit's times (``time.perf_counter``): its start, each training batch's start and end, and each batch's
    image count.

    ``sync``: wait for the GPU at each batch end, so that an end is when the step's work finished.
    ``stop_after``: a throughput probe: the fit stops ``stop_after`` seconds after the first batch end once three
    ends are timed, or twice that with two (slow steps)."""

    def __init__(self, sync: bool = False, stop_after: float | None = None) -> None:
        self.sync = sync
        self.stop_after = stop_after
        self.start: float | None = None
        self.batch_starts: list[float] = []
        self.ends: list[float] = []
        self.images: list[int] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch_starts.append(time.perf_counter())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.sync and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.ends.append(time.perf_counter())
        image = batch.get("image") if isinstance(batch, dict) else None
        self.images.append(int(image.shape[0]) if isinstance(image, Tensor) else 0)
        if self.stop_after is not None:
            n, span = len(self.ends), self.ends[-1] - self.ends[0]
            if (n >= 3 and span >= self.stop_after) or (n >= 2 and span >= 2 * self.stop_after):
                trainer.should_stop = True

    @property
    def step_times(self) -> list[float]:
        """Each step's seconds, end to end (the first from the fit's start): data fetch and hooks included."""
        return intervals([self.start, *self.ends] if self.start is not None else self.ends)

    @property
    def train_seconds(self) -> float:
        """From the fit's start to the last step's end (0 before the first)."""
        return self.ends[-1] - self.start if self.ends and self.start is not None else 0.0

    def steps_per_s(self, skip: int) -> float:
        """Steps/s after the first ``skip`` steps (the warm-up of workers and kernels; fewer when fewer were timed,
        NaN under two)."""
        n = len(self.ends)
        if n < 2:
            return math.nan
        k = min(skip, n - 2)
        return (n - 1 - k) / max(1e-6, self.ends[-1] - self.ends[k])

    def images_per_s(self) -> float:
        """Images/s from the first step's end (warm-up) to the last one's, the data loading between them included."""
        if len(self.ends) < 2 or self.ends[-1] <= self.ends[0]:
            return math.nan
        return sum(self.images[1:]) / (self.ends[-1] - self.ends[0])


# ---------------------------------------------------------------------------------------------- trainer, configs
def resolve_device(accelerator: str, precision: str | None) -> tuple[str, str]:
    """``--accelerator`` / ``--precision`` as the training benchmarks take them: ``auto`` is the GPU when CUDA is
    there (``cuda`` means ``gpu``); precision bf16-mixed on the GPU and 32-true on the CPU unless given."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda":
        accelerator = "gpu"
    if precision is None:
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    return accelerator, "32-true" if precision == "32" else precision


def quiet_trainer(
    accelerator: str,
    precision: str,
    root: str | Path | None = None,
    *,
    max_time_s: float | None = None,
    csv_logs: bool = False,
    **more: Any,
) -> dict[str, Any]:
    """The Trainer settings of one benchmark run, as a config's ``trainer`` section or ``Trainer(**...)``: one
    device, epochs unbounded (``max_steps`` in ``more`` ends the fit), ``max_time_s`` only a guard, no validation
    during training (``validate_once`` runs it after), no sanity check, progress bar, model summary, checkpoints or
    callbacks, files under ``root``; logs: a CSV logger under ``root`` with ``csv_logs`` (config form), else none.
    ``more`` adds or replaces settings."""
    logger: dict[str, Any] | bool = False
    if csv_logs:
        logger = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(root), "name": "lightning_logs"},
        }
    tr: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": 1,
        "precision": precision,
        "max_epochs": -1,
        "max_time": None if max_time_s is None else hms(max_time_s),
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": logger,
        "callbacks": [],
    }
    if root is not None:
        tr["default_root_dir"] = str(root)
    return {**tr, **more}


def validate_once(
    trainer: Trainer, model: LightningModule, datamodule: LightningDataModule
) -> dict[str, float]:
    """One full validation pass after a fit that ran without any (``quiet_trainer``): its metrics as floats."""
    trainer.limit_val_batches = 1.0
    res = trainer.validate(model, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (res[0] if res else {}).items()}


def loader_settings(num_workers: int, accelerator: str) -> dict[str, Any]:
    """DataLoader settings of a run: its workers persist across epochs (and keep their image caches); memory is
    pinned for the GPU."""
    return {
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "pin_memory": accelerator == "gpu",
    }


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def write_yaml(obj: dict[str, Any], path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")
    return path


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``over`` laid on it: sections (dicts) merge key by key, any other value, a list too,
    replaces (to swap a ``class_path``, replace its whole section)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def derive_config(
    path: Path, over: dict[str, Any], base: str | Path | dict[str, Any] = UNIFIED_CONFIG
) -> Path:
    """A run's config: ``base`` (a config file or a loaded one; default ``lightning_configs/unified.yaml``) with
    ``over`` merged in, written whole to ``path`` (what the run sets is in one file, not spread over layers)."""
    return write_yaml(merged(base if isinstance(base, dict) else load_yaml(base), over), path)


def step_bounded_config(path: Path, run: Path, seed: int, steps: int, over: dict[str, Any]) -> Path:
    """A run of ``lightning_configs/unified.yaml`` for exactly ``steps`` optimiser steps with one validation at the
    end, no checkpoints or callbacks, CSV logs in ``run/logs/version_0``; ``over`` merged on top."""
    base = {
        "seed_everything": seed,
        "trainer": {
            "max_steps": steps,
            "max_epochs": -1,
            "max_time": None,
            # counted in training batches across epochs, so a run longer than one epoch validates once, at the end
            "val_check_interval": steps,
            "check_val_every_n_epoch": None,
            "default_root_dir": str(run),
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "callbacks": [],
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run), "name": "logs", "version": 0},
            },
        },
    }
    return derive_config(path, merged(base, over))


def fit_subprocess(cfg: Path, log: Path) -> float:
    """``idrecog fit --config cfg`` in a child process (its output to ``log``); the wall-clock seconds it took."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "idrecog.cli", "fit", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg} failed (rc {proc.returncode}), see {log}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def last_val_metrics(run: Path) -> dict[str, float]:
    """The last logged value of every ``val/...`` key in ``run/logs/version_0/metrics.csv``."""
    import csv

    last: dict[str, float] = {}
    with (run / "logs" / "version_0" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            last.update({k: float(v) for k, v in row.items() if v not in ("", None) and k.startswith("val/")})
    return last


@contextmanager
def bare_argv() -> Iterator[None]:
    """``sys.argv`` cut to the program's name while a LightningCLI parses an argument list of its own (it warns
    when ``sys.argv`` holds other arguments, this script's)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def unified_cli(argv: list[str]) -> LightningCLI:
    """``idrecog fit``'s LightningCLI (``idrecog.cli.train.build_cli``) built in-process from ``argv``, not run."""
    from idrecog.cli.train import build_cli

    with bare_argv():
        return build_cli(argv, run=False)


# ---------------------------------------------------------------------------------------------- data
def _say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def ensure_dataset(
    root: Path,
    train: int,
    val: int,
    size: tuple[int, int],
    *,
    workers: int = 2,
    progress: bool = True,
    say: Callable[[str], None] = _say,
) -> Path:
    """The synthetic benchmark at ``size`` (H, W) in ``root``: generated there on first use (no test split),
    reused after."""
    if not (root / "tasks.yaml").is_file():
        from idrecog.synth.generate import generate_dataset

        say(f"generating the synthetic benchmark into {root} ({train} train, {val} val, {size[0]}x{size[1]})")
        generate_dataset(
            root,
            train=train,
            val=val,
            test=0,
            height=size[0],
            width=size[1],
            workers=workers,
            progress=progress,
        )
    return root


# ---------------------------------------------------------------------------------------------- CPU benchmarks
def cpu_parser(doc: str, *, batch: int, quick: str) -> argparse.ArgumentParser:
    """The options the CPU benchmarks (overhead, scaling, data_pipeline, unified_vs_separate) share: batch, the
    default config's model at an encoder depth and decoder width, torch threads, ``--quick`` (``quick`` says what
    it sets) and ``--smoke``. Each script adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--img_size", type=int, nargs=2, default=[160, 256])
    p.add_argument("--depth", type=int, default=4, help="encoder depth (default config: 4)")
    p.add_argument("--dec_dim", type=int, default=128, help="decoder width (default config: 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--smoke", action="store_true", help="a tiny setting that only checks the script works")
    return p


def parse_cpu_args(
    p: argparse.ArgumentParser, argv: Sequence[str] | None, *, quick: dict[str, Any], smoke: dict[str, Any]
) -> argparse.Namespace:
    """Parse a ``cpu_parser``'s arguments: ``--quick`` sets the values in ``quick``; ``--smoke`` those in ``smoke``
    and a tiny model (64 x 96 images, one encoder block, a 64-wide decoder, one thread)."""
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(quick)
    if args.smoke:
        vars(args).update({"img_size": [64, 96], "depth": 1, "dec_dim": 64, "threads": 1, **smoke})
    return args


def small_unified(
    catalogue: TaskCatalogue,
    img_size: Sequence[int],
    depth: int,
    dec_dim: int,
    *,
    seed: int = 0,
    det_queries: int = 16,
    **module: Any,
) -> UnifiedModule:
    """The default CPU config's model (lightning_configs/unified.yaml: ViT-Tiny, decoder of 2 blocks x 4 heads) at
    encoder depth ``depth`` and decoder width ``dec_dim``, its weights drawn from ``seed``; ``module``: more
    UnifiedModule arguments (encoder lr scale 1.0 and layer decay 0.9 unless given)."""
    from idrecog.lit.unified import UnifiedModule
    from idrecog.models.decoder import TaskDecoder
    from idrecog.models.encoder import ViTEncoder

    torch.manual_seed(seed)
    return UnifiedModule(
        catalogue=catalogue.to_dict(),
        encoder=ViTEncoder("vit_tiny_patch16_224", img_size=tuple(img_size), depth=depth, drop_path_rate=0.0),
        decoder=TaskDecoder(dim=dec_dim, depth=2, num_heads=4),
        task_options={"detection": {"num_queries": det_queries}}
        if "detection" in catalogue.types()
        else None,
        **{"encoder_lr_scale": 1.0, "layer_decay": 0.9, **module},
    )


def plain_loss(module: UnifiedModule, batch: dict[str, Any]) -> Tensor:
    """What ``UnifiedModule._shared_step`` computes for the gradient, without logging or meters."""
    out = module.model(batch["image"], batch=batch, route="known")
    return module.compute_losses(out, batch)[0]
