"""``idrecog pretrain`` (MAE pretraining, a LightningCLI) and ``idrecog export-encoder`` (timm-format weights).

``idrecog pretrain`` takes no sub-command: the CLI is built with ``run=False`` and this module calls
``trainer.fit`` itself (``--ckpt_path`` resumes). Without ``--config`` it reads the packaged default,
``idrecog/configs/pretrain_mae.yaml`` (write a copy to edit with ``idrecog pretrain --print_config``); every other
LightningCLI option works as usual (``--print_config``, ``--trainer.max_steps=...``, ``--model.mask_ratio=...``).
It shares ``fit``'s set-up (:class:`idrecog.cli.base.IdrecogLightningCLI`): outputs under
``--trainer.default_root_dir``, atomic checkpoints, ``last.ckpt`` on SIGTERM (exit code 143), and
``--ckpt_path`` (a file, or ``last``) read with ``weights_only=True``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from idrecog.errors import ConfigError

DEFAULT_CONFIG = "pretrain_mae.yaml"


def default_config_path() -> Path:
    """The packaged default pretraining config (``idrecog/configs/pretrain_mae.yaml``)."""
    return Path(str(resources.files("idrecog.configs").joinpath(DEFAULT_CONFIG)))


def run_pretrain(argv: Sequence[str] | None = None) -> int:
    """``idrecog pretrain [LightningCLI options]``; returns the exit code."""
    from lightning.pytorch.cli import LightningArgumentParser

    from idrecog.cli.base import IdrecogLightningCLI, config_files
    from idrecog.data.pretrain import PretrainDataModule
    from idrecog.lit.mae import MAEPretrainModule

    class PretrainCLI(IdrecogLightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument(
                "--ckpt_path",
                type=str | None,
                default=None,
                help="resume from this checkpoint (a path, or `last`: the run folder's last.ckpt)",
            )

    argv = list(sys.argv[1:] if argv is None else argv)
    # `idrecog pretrain ...` always passes args; Lightning would warn that sys.argv also holds arguments
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    if not config_files(argv):
        argv = ["--config", str(default_config_path()), *argv]
    try:
        cli = PretrainCLI(
            MAEPretrainModule,
            PretrainDataModule,
            args=argv,
            run=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "idrecog pretrain",
                "description": "MAE self-supervised pretraining of the encoder.",
            },
        )
    except SystemExit as e:  # --help, --print_config, argument errors: jsonargparse already printed
        return int(e.code or 0) if isinstance(e.code, int | None) else 2
    model, dm = cli.model, cli.datamodule
    cli.check_image_size()
    cli.trainer.fit(model, datamodule=dm, ckpt_path=cli.config.get("ckpt_path"))
    if cli.trainer.is_global_zero and not cli.trainer.fast_dev_run:
        cb = cli.trainer.checkpoint_callback
        last = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if last:
            print(
                f"[idrecog] pretrained checkpoint: {last}\n"
                f"  hand-off: idrecog fit --config lightning_configs/unified.yaml "
                f"--model.encoder.init_from={last}\n"
                f"  export:   idrecog export-encoder --ckpt_path {last} --out encoder.safetensors"
            )
    return 0


# ---------------------------------------------------------------------- export-encoder
def find_encoder_config(hparams: Any) -> dict[str, Any] | None:
    """The ``ViTEncoder`` init arguments inside saved hyper-parameters (a class config or plain kwargs)."""
    if isinstance(hparams, Mapping):
        cp = hparams.get("class_path")
        if isinstance(cp, str) and cp.endswith("ViTEncoder"):
            return dict(hparams.get("init_args") or {})
        if "name" in hparams and "img_size" in hparams:
            return dict(hparams)
        for key in ("encoder", *hparams.keys()):
            sub = hparams.get(key)
            if isinstance(sub, Mapping):
                found = find_encoder_config(sub)
                if found is not None:
                    return found
    return None


def export_encoder(
    ckpt_path: str | Path, out: str | Path, overrides: Mapping[str, Any] | None = None
) -> tuple[Path, dict[str, str]]:
    """Write the encoder of an ``idrecog pretrain`` / ``idrecog fit`` checkpoint as timm-format safetensors.

    Returns (path, metadata); metadata has ``timm_name``, ``img_size`` ("h,w"), ``grid_size`` ("h,w"), and the
    architecture overrides ``depth``, ``embed_dim``, ``num_heads``.
    """
    from safetensors.torch import save_file

    from idrecog.models.encoder import ViTEncoder, architecture_config, extract_timm_state
    from idrecog.utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    cfg = find_encoder_config(ckpt.get("hyper_parameters") or {}) or {}
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "name" not in cfg:
        raise ConfigError(
            f"{ckpt_path}: no encoder config in the checkpoint's hyper-parameters; pass --name and --img_size"
        )
    cfg = architecture_config(cfg)
    cfg["img_size"] = tuple(cfg.get("img_size") or (224, 224))
    known = {
        "name",
        "img_size",
        "depth",
        "embed_dim",
        "num_heads",
        "drop_path_rate",
        "init_from",
        "pretrained",
        "pretrained_file",
        "model_kwargs",
    }
    encoder = ViTEncoder(**{k: v for k, v in cfg.items() if k in known})
    state = ckpt.get("state_dict") if isinstance(ckpt.get("state_dict"), dict) else ckpt
    missing, _unexpected = encoder.vit.load_state_dict(extract_timm_state(state), strict=False)
    if missing:
        raise ConfigError(
            f"{ckpt_path}: the checkpoint lacks encoder weights: {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gh, gw = encoder.grid_size
    meta = {
        "format": "pt",
        "timm_name": encoder.name,
        "img_size": f"{encoder.img_size[0]},{encoder.img_size[1]}",
        "grid_size": f"{gh},{gw}",
        "depth": str(len(encoder.vit.blocks)),
        "embed_dim": str(encoder.embed_dim),
        "num_heads": str(encoder.vit.blocks[0].attn.num_heads),
    }
    save_file({k: v.contiguous() for k, v in encoder.timm_state_dict().items()}, str(out), metadata=meta)
    return out, meta


def export_encoder_main(argv: Sequence[str] | None = None) -> int:
    """``idrecog export-encoder --ckpt_path X --out encoder.safetensors``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="idrecog export-encoder",
        description="Write the encoder weights of a checkpoint in timm format (safetensors) with metadata.",
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="an idrecog pretrain or fit checkpoint")
    parser.add_argument("--out", type=str, default="encoder.safetensors", help="output .safetensors file")
    parser.add_argument(
        "--name", type=str | None, default=None, help="timm model name (default: from the checkpoint)"
    )
    parser.add_argument(
        "--img_size", type=tuple[int, int] | None, default=None, help="(H, W) (default: from the checkpoint)"
    )
    parser.add_argument(
        "--depth", type=int | None, default=None, help="encoder depth (default: from the checkpoint)"
    )
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int | None) else 2
    if not str(args.out).endswith(".safetensors"):
        raise ConfigError(
            f"--out must end in .safetensors (timm picks the loader by extension), got {args.out!r}"
        )
    path, meta = export_encoder(
        args.ckpt_path, args.out, {"name": args.name, "img_size": args.img_size, "depth": args.depth}
    )
    print(
        f"[idrecog] wrote {path} ({meta['timm_name']}, img_size {meta['img_size']}, grid {meta['grid_size']})"
    )
    extra = f", depth={meta['depth']}" if meta.get("depth") else ""
    print(
        f"  timm: timm.create_model('{meta['timm_name']}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='{path}'), img_size=({meta['img_size']}){extra}, num_classes=0)"
    )
    return 0
