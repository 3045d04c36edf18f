"""LightningModule for MAE pretraining: AdamW with the MAE learning-rate scaling rule, linear warm-up then cosine.

The autoencoder sits at ``model`` (as in the unified LightningModule), so the encoder's timm weights are saved as
``model.encoder.vit.*``, which
``ViTEncoder(init_from=<this checkpoint>)`` and ``idrecog export-encoder`` read directly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from timm.optim import param_groups_weight_decay
from torch import Tensor

from idrecog.errors import ConfigError
from idrecog.lit.optim import WarmupCosine, make_adamw, warmup_cosine_schedule
from idrecog.models.encoder import ViTEncoder, architecture_config
from idrecog.models.mae import MaskedAutoencoder

ENCODER_CLASS_PATH = "idrecog.models.encoder.ViTEncoder"
DEFAULT_ENCODER: dict[str, Any] = {"name": "vit_tiny_patch16_224", "img_size": (160, 256), "depth": 6}


def scaled_lr(base_lr: float, effective_batch_size: int) -> float:
    """MAE's linear scaling rule: lr = base_lr * effective batch size / 256."""
    return base_lr * effective_batch_size / 256


def encoder_config(encoder: ViTEncoder) -> dict[str, Any]:
    """The encoder as a LightningCLI class config (``class_path`` + ``init_args``) that rebuilds its architecture,
    so hyper-parameters hold plain values, never a pickled module. The weight sources (``init_from``,
    ``pretrained``, ``pretrained_file``) are cleared: a checkpoint holds the weights itself, and reloading it must not
    need the original weight file or the hub."""
    init_args = dict(
        getattr(encoder, "init_args", None) or {"name": encoder.name, "img_size": list(encoder.img_size)}
    )
    return {"class_path": ENCODER_CLASS_PATH, "init_args": architecture_config(init_args)}


def build_encoder(config: ViTEncoder | Mapping[str, Any] | None) -> ViTEncoder:
    """A ``ViTEncoder`` from a module, a class config ``{"class_path", "init_args"}``, plain kwargs or None
    (the default tiny encoder, the same as the unified model's default)."""
    if isinstance(config, ViTEncoder):
        return config
    if config is None:
        return ViTEncoder(**DEFAULT_ENCODER)
    if not isinstance(config, Mapping):
        raise ConfigError(f"model.encoder must be a ViTEncoder or its config, got {type(config).__name__}")
    if "class_path" in config:
        if config["class_path"] not in (ENCODER_CLASS_PATH, "ViTEncoder"):
            raise ConfigError(
                f"model.encoder.class_path must be {ENCODER_CLASS_PATH}, got {config['class_path']!r}"
            )
        config = config.get("init_args") or {}
    kwargs = dict(config)
    if "img_size" in kwargs:
        kwargs["img_size"] = tuple(kwargs["img_size"])
    return ViTEncoder(**kwargs)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup_steps``, then half-cosine down to ``min_ratio`` at ``total_steps``
    (the unified model's :class:`~idrecog.lit.optim.WarmupCosine`, as a function)."""
    return WarmupCosine(warmup_steps, total_steps, min_ratio)(step)


class MAEPretrainModule(LightningModule):
    """MAE pretraining of a :class:`ViTEncoder`.

    Args:
        encoder: the ViT; ``None`` builds the default (``vit_tiny_patch16_224``, 160 x 256, depth 6).
        mask_ratio: fraction of patches removed.
        decoder_dim / decoder_depth / decoder_heads: decoder size (``None``: sized to the encoder).
        norm_pix_loss: per-patch normalised pixel targets.
        base_lr: the learning rate per 256 images; the actual rate is ``base_lr * effective_batch / 256``.
        weight_decay / betas: AdamW (no decay on biases, norms, position embeddings and tokens).
        warmup_steps: linear warm-up length in optimiser steps, or a fraction (< 1) of all steps.
        min_lr: the cosine schedule's floor.
        compile: ``torch.compile`` the autoencoder.
        fused_adamw: use the fused AdamW kernel; ``None``: when training on CUDA.
    """

    def __init__(
        self,
        encoder: ViTEncoder | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        norm_pix_loss: bool = True,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int | float = 50,
        min_lr: float = 0.0,
        compile: bool = False,
        fused_adamw: bool | None = None,
    ) -> None:
        super().__init__()
        enc = build_encoder(encoder)  # type: ignore[arg-type]
        # record the encoder's config, never the module (checkpoints must load with torch.load(weights_only=True))
        self.save_hyperparameters(ignore=["encoder"])
        self.hparams["encoder"] = encoder_config(enc)
        self._hparams_initial = copy.deepcopy(self._hparams)
        self.model = MaskedAutoencoder(
            enc,
            mask_ratio=mask_ratio,
            decoder_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
            norm_pix_loss=norm_pix_loss,
        )
        self.lr: float | None = None  # set in configure_optimizers

    @property
    def encoder(self) -> ViTEncoder:
        return self.model.encoder

    def configure_model(self) -> None:
        if self.hparams.get("compile") and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def forward(self, imgs: Tensor, mask_ratio: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: [N, 3, H, W] -> (loss, pred [N, L, p*p*3], mask [N, L])."""
        return self.model(imgs, mask_ratio)

    @staticmethod
    def _images(batch: Any) -> Tensor:
        return batch["image"] if isinstance(batch, Mapping) else batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        imgs = self._images(batch)
        loss, _, _ = self.model(imgs)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=imgs.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        imgs = self._images(batch)
        # the same masks every validation, so val/loss moves only with the weights
        gen = torch.Generator(device=imgs.device).manual_seed(1000 + batch_idx)
        loss, _, _ = self.model(imgs, generator=gen)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=imgs.shape[0])
        return loss

    @torch.no_grad()
    def reconstruct(self, imgs: Tensor, seed: int = 0) -> dict[str, Tensor]:
        """For the reconstruction pictures: see :meth:`MaskedAutoencoder.reconstruct` (masks fixed by ``seed``)."""
        gen = torch.Generator(device=imgs.device).manual_seed(seed)
        return self.model.reconstruct(imgs, generator=gen)

    # ------------------------------------------------------------------ optimisation
    def effective_batch_size(self) -> int:
        """Images per optimiser step: batch size x accumulate_grad_batches x world size."""
        trainer = self.trainer
        bs = None
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and getattr(dm, "batch_size", None):
            bs = int(dm.batch_size)
        if bs is None:
            loader = trainer.train_dataloader
            if loader is None:
                trainer.fit_loop.setup_data()
                loader = trainer.train_dataloader
            bs = int(getattr(loader, "batch_size", None) or 1)
        return bs * int(trainer.accumulate_grad_batches) * int(trainer.world_size)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        eff = self.effective_batch_size()
        self.lr = scaled_lr(float(hp.base_lr), eff)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = float(hp.warmup_steps)
        warmup_steps = round(warmup * total) if 0 < warmup < 1 else int(warmup)
        warmup_steps = min(warmup_steps, max(0, total - 1))
        if self.trainer.is_global_zero:
            print(
                f"[idrecog] MAE lr = base_lr {hp.base_lr:g} x effective batch {eff} / 256 = {self.lr:.3g}; "
                f"{warmup_steps} warm-up steps, cosine to min_lr {hp.min_lr:g} over {total} steps",
                flush=True,
            )
        groups = param_groups_weight_decay(self.model, float(hp.weight_decay), self.model.no_weight_decay())
        fused = hp.fused_adamw
        if fused is None:
            fused = self.device.type == "cuda"
        opt = make_adamw(groups, self.lr, bool(fused), betas=tuple(hp.betas))
        min_ratio = float(hp.min_lr) / self.lr if self.lr > 0 else 0.0
        return {
            "optimizer": opt,
            "lr_scheduler": warmup_cosine_schedule(opt, warmup_steps, total, min(1.0, min_ratio)),
        }
