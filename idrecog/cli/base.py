"""What every idrecog training command shares (``fit | validate | test | predict`` and ``pretrain``): one
LightningCLI base class, so the commands read configs, resume and save checkpoints the same way.

* **One run folder.** Configs are read in jsonargparse's ``omegaconf+`` mode: a shipped config derives its logs,
  checkpoints and predictions from ``trainer.default_root_dir`` (``dirpath: ${trainer.default_root_dir}/checkpoints``)
  and the encoder's input size from the data (``img_size: ${data.img_size}``). Interpolations are resolved after
  the command line is merged, so ``--trainer.default_root_dir=runs/b`` moves every output of the run.
* **Safe resume.** ``--ckpt_path``'s hyper-parameters are read with ``weights_only=True`` into the model config;
  a file that needs code to unpickle is one :class:`~idrecog.errors.ConfigError` line.
* **Reliable checkpoints.** The trainer writes checkpoints atomically (:class:`AtomicCheckpointIO`, which also
  resumes with ``weights_only=True``) and saves ``last.ckpt`` on SIGTERM (:class:`PreemptionCheckpoint`).
* **One image size.** ``data.img_size`` must equal the encoder's ``img_size`` (one error line instead of a shape
  error in the first forward pass).
* **Readable config errors.** Every ``--config`` file is read before parsing: a YAML syntax error, an empty file or
  one that is not a mapping is one :class:`~idrecog.errors.ConfigError` line naming the file (and the line).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from idrecog.errors import ConfigError

# jsonargparse parser mode: OmegaConf interpolation resolved on the final config (files + command line)
PARSER_MODE = "omegaconf+"


def config_files(argv: Sequence[str]) -> list[str]:
    """The values of ``--config`` / ``-c`` / ``--config=X`` in ``argv``, in order."""
    found = []
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            found.append(a.split("=", 1)[1])
        elif a in ("--config", "-c") and i + 1 < len(argv):
            found.append(argv[i + 1])
    return found


def check_config_files(argv: Sequence[str]) -> None:
    """Raise a :class:`ConfigError` naming the file (and line) for a ``--config`` file that is not a YAML mapping.

    jsonargparse reports these as ``Unexpected config`` or a YAML error about ``<unicode string>``, without the
    file. Values that are not files are left to jsonargparse (it names a missing file itself).
    """
    import yaml

    for value in config_files(argv):
        path = Path(value)
        if not path.is_file():
            continue
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as e:
            mark, ctx = e.problem_mark or e.context_mark, e.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            msg = f"{where}: not valid YAML: {e.problem or e.context}"
            if e.problem and e.context and ctx is not None:
                msg += f" ({e.context} that starts at line {ctx.line + 1}, column {ctx.column + 1})"
            raise ConfigError(msg) from e
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if content is None:
            raise ConfigError(f"{path}: the config file is empty")
        if not isinstance(content, dict):
            raise ConfigError(
                f"{path}: a config file holds a mapping of options (trainer:, model:, data:, ...), "
                f"this one holds a {type(content).__name__}"
            )


class IdrecogLightningCLI(LightningCLI):
    """LightningCLI with idrecog's config, resume and checkpoint conventions (see the module docstring)."""

    def __init__(self, *args: Any, parser_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        from jsonargparse import set_parsing_settings

        check_config_files(kwargs.get("args") or [])

        # a config given to a subcommand (`idrecog fit --config X`) lands under `fit.`: absolute interpolations
        # such as ${trainer.default_root_dir} are made relative to where they stand in their file, so the same
        # file works for every subcommand and for `idrecog pretrain` (which has none)
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(*args, parser_kwargs={"parser_mode": PARSER_MODE, **(parser_kwargs or {})}, **kwargs)

    @override
    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path``'s hyper-parameters into the model config, like LightningCLI, but safely.

        The file is read with ``weights_only=True``. A class-path model config (``fit``) keeps the config's class
        path (idrecog modules store plain hparams); the catalogue (a link target, from the data) is left out:
        ``on_load_checkpoint`` compares it instead.
        """
        from idrecog.utils.checkpoint import load_checkpoint

        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        path = cfg.get("ckpt_path")
        if not path or not Path(path).is_file():  # also `last`/`best`: Lightning resolves those names itself
            return
        hparams = dict(load_checkpoint(path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        hparams.pop("catalogue", None)
        class_path = hparams.pop("_class_path", None)
        if not hparams:
            return
        model_cfg = cfg.get("model")
        if model_cfg is not None and "class_path" in model_cfg:  # subclass mode (fit's LightningModule)
            model: dict[str, Any] = {
                "class_path": class_path or model_cfg.get("class_path"),
                "init_args": hparams,
            }
        else:
            model = hparams
        self.config = self.parser.parse_object(
            {sub: {"model": model}} if sub else {"model": model}, self.config
        )

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # reliability (docs/reliability.md): SIGTERM and the end of fit save last.ckpt; checkpoints are written
        # atomically and read with weights_only=True (a user's own CheckpointIO plug-in is kept)
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        from idrecog.callbacks.reliability import PreemptionCheckpoint
        from idrecog.utils.checkpoint import AtomicCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):  # type: ignore[attr-defined]
            trainer.callbacks.append(PreemptionCheckpoint())  # type: ignore[attr-defined]
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def check_image_size(self) -> None:
        """``data.img_size`` must equal the encoder's: the images go to the ViT unresized."""
        check_image_size(self.datamodule, self.model)


def encoder_img_size(model: LightningModule) -> tuple[int, int] | None:
    """The input size of the ViT that sees the DataModule's images as they are (the MAE or unified model's
    encoder); None for models that resize their input (the task classifier)."""
    from idrecog.models.encoder import ViTEncoder

    for owner in (model, getattr(model, "model", None)):
        enc = getattr(owner, "encoder", None)
        if isinstance(enc, ViTEncoder):
            return tuple(enc.img_size)  # type: ignore[return-value]
    return None


def check_image_size(datamodule: LightningDataModule | None, model: LightningModule) -> None:
    data_size = getattr(datamodule, "img_size", None)
    enc_size = encoder_img_size(model)
    if data_size is not None and enc_size is not None and tuple(data_size) != enc_size:
        raise ConfigError(
            f"data.img_size {tuple(data_size)} differs from the encoder's img_size {enc_size}; set them equal "
            "(the shipped configs write `img_size: ${data.img_size}` in the encoder)"
        )
