"""``idrecog fit | validate | test | predict``: LightningCLI over the idrecog LightningModules and ``IdDataModule``.

The task catalogue is written once, in the data section (it lives in the dataset folder), and linked into the
model when both are instantiated (``link_arguments(..., apply_on="instantiate")``), so a config never repeats it.
Paths and the encoder's image size are interpolations (``${trainer.default_root_dir}``, ``${data.img_size}``):
see :mod:`idrecog.cli.base`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from typing_extensions import override

from idrecog.cli.base import IdrecogLightningCLI
from idrecog.data.datamodule import IdDataModule
from idrecog.errors import ConfigError, IdrecogError


def query_shorthands() -> dict[str, str]:
    """``--model.queries=NAME`` for every registered query provider: name -> class path."""
    from idrecog.models.queries import QUERY_PROVIDERS

    return {name: QUERY_PROVIDERS.class_path(name) for name in QUERY_PROVIDERS.names()}


def _catalogue_dict(dm: IdDataModule) -> dict[str, Any]:
    return dm.catalogue.to_dict()


class IdrecogSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` beside the logs, and the fully resolved config into ``wandb.config`` when W&B logs.

    LightningCLI only writes the file; W&B dashboards need the values to group and filter runs by design, seed...
    """

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.parser.dump(self.config, skip_none=False, format="json")
                import json

                logger.experiment.config.update(json.loads(config), allow_val_change=True)


class IdrecogCLI(IdrecogLightningCLI):
    """``idrecog fit | validate | test | predict``; config, resume and checkpoint conventions come from
    :class:`~idrecog.cli.base.IdrecogLightningCLI`."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data", "model.init_args.catalogue", compute_fn=_catalogue_dict, apply_on="instantiate"
        )

    @override
    def before_instantiate_classes(self) -> None:
        # Generating a missing synthetic benchmark happens in prepare_data. Here: name W&B runs by design.
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        name_wandb_runs(cfg)

    def _configure_data(self) -> None:
        """Before the trainer runs: the DataModule learns what the model needs (frames, user vocabularies)
        before any dataset is built, and the data reports that apply join the trainer's callbacks."""
        from idrecog.callbacks.data_reports import MaskedLabelReport, SkipReport

        dm, model = self.datamodule, self.model
        self.check_image_size()
        needs = getattr(model, "data_requirements", None)
        if callable(needs) and callable(getattr(dm, "configure", None)):
            dm.configure(**needs())
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        catalogue = getattr(dm, "catalogue", None)
        if catalogue is not None and any(s.uses_frames for s in catalogue):
            if not any(isinstance(c, MaskedLabelReport) for c in callbacks):
                callbacks.append(MaskedLabelReport(catalogue))
        if getattr(dm, "on_error", None) == "skip" and not any(isinstance(c, SkipReport) for c in callbacks):
            callbacks.append(SkipReport())

    def before_fit(self) -> None:
        self._configure_data()

    def before_validate(self) -> None:
        self._configure_data()

    def before_test(self) -> None:
        self._configure_data()

    def before_predict(self) -> None:
        self._configure_data()

    def _print_table(self, title: str) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        if not metrics or not self.trainer.is_global_zero:
            return
        from idrecog.lit.unified import format_metrics_table

        catalogue = getattr(self.datamodule, "catalogue", None)
        # a module with keys of its own (the task classifier) formats them; else the per-task-type table
        fmt = getattr(self.model, "format_metrics", None)
        table = fmt(metrics) if callable(fmt) else format_metrics_table(metrics, catalogue)
        print(f"\n{title}\n" + table, flush=True)
        if self.trainer.logger is not None and getattr(self.trainer.logger, "log_dir", None):
            print(f"metrics: {os.path.join(self.trainer.logger.log_dir, 'metrics.csv')}")
        ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if ckpt:
            print(f"best checkpoint: {ckpt}")

    def after_fit(self) -> None:
        self._print_table("validation metrics (last epoch)")

    def after_validate(self) -> None:
        self._print_table("validation metrics")

    def after_test(self) -> None:
        self._print_table("test metrics")


def query_design(class_path: str | None) -> str:
    """A provider class path -> its shorthand (``learned``, ``text``, ``multimodal``), else the class name."""
    if not class_path:
        return "learned"
    for short, path in query_shorthands().items():
        if class_path in (path, short):
            return short
    return str(class_path).rpartition(".")[2]


def name_wandb_runs(cfg: Any) -> None:
    """Fill unset ``group`` / ``name`` / ``tags`` of W&B loggers in a parsed config from the query design and
    the seed (``multimodal``, ``multimodal-s1``), so dashboards group runs by design without extra flags."""
    trainer = cfg.get("trainer") if hasattr(cfg, "get") else None
    loggers = trainer.get("logger") if trainer is not None else None
    if loggers is None or isinstance(loggers, bool):
        return
    model = cfg.get("model")
    queries = (
        model.get("init_args", {}).get("queries") if model is not None and hasattr(model, "get") else None
    )
    design = query_design(queries.get("class_path") if hasattr(queries, "get") else None)
    seed = cfg.get("seed_everything")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        if not hasattr(lg, "get") or not str(lg.get("class_path", "")).endswith("WandbLogger"):
            continue
        args = lg.get("init_args")
        if args is None:
            continue
        if args.get("group") is None:
            args["group"] = design
        if args.get("name") is None:
            args["name"] = f"{design}-s{seed}" if seed is not None else design
        tags = list(args.get("tags") or [])
        args["tags"] = tags + [t for t in (design, f"seed{seed}") if t not in tags]


def expand_shorthands(argv: list[str]) -> list[str]:
    """Rewrite ``--model.queries=learned|text|multimodal`` (any registered provider) to its class path."""
    shorthands = query_shorthands()
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--model.queries="):
            key, val = a.split("=", 1)
            a = f"{key}={shorthands.get(val, val)}"
        elif i and argv[i - 1] == "--model.queries":  # the value of the two-word form
            a = shorthands.get(a, a)
        out.append(a)
    return out


def build_cli(argv: list[str], run: bool = True) -> IdrecogCLI:
    return IdrecogCLI(
        model_class=LightningModule,
        datamodule_class=IdDataModule,
        subclass_mode_model=True,
        save_config_callback=IdrecogSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs={"exit_on_error": False},  # run_unified turns parse errors into one ConfigError line
        args=expand_shorthands(argv),
        run=run,
    )


def run_unified(argv: list[str]) -> int:
    """Entry point of ``idrecog fit|validate|test|predict`` (argv starts with the subcommand)."""
    saved = sys.argv
    sys.argv = saved[:1]  # the arguments come in `argv`; LightningCLI would warn about sys.argv too
    from jsonargparse import ArgumentError

    try:
        build_cli(argv)
    except IdrecogError:
        raise
    except Exception as e:
        # jsonargparse wraps an error raised while instantiating (e.g. ViTEncoder's unknown-name ConfigError)
        # in its own ValueError: surface the idrecog error, whose message is the useful one
        inner = _find_idrecog_error(e)
        if inner is not None:
            raise inner from e
        if isinstance(e, ArgumentError):
            raise ConfigError(_one_line(str(e))) from e
        raise
    finally:
        sys.argv = saved
    return 0


def _find_idrecog_error(e: BaseException) -> IdrecogError | None:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, IdrecogError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _one_line(text: str) -> str:
    """jsonargparse's multi-line messages (one line per tried Union subtype) as one short line."""
    noise = ("Does not validate against any of the Union subtypes", "Subtypes", "Errors")
    lines = [ln.strip(" -:") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(noise)]
    seen: list[str] = []
    for ln in lines:
        if ln not in seen:
            seen.append(ln)
    return ": ".join(seen[:1]) + (": " + "; ".join(seen[1:4]) if len(seen) > 1 else "")


if __name__ == "__main__":
    sys.exit(run_unified(sys.argv[1:]))
