"""Reconstruction pictures during masked-image pretraining: original | masked input | reconstruction |
reconstruction with the visible patches pasted back, one row per fixed validation image.

Works with any LightningModule that has ``reconstruct(imgs [N, 3, H, W], seed) -> {"masked", "reconstruction",
"pasted": [N, 3, H, W]}`` (``MAEPretrainModule`` does). PNGs go to ``<log_dir>/images/step_XXXXXX.png``; with a
``WandbLogger`` the same picture is also logged as a ``wandb.Image`` under ``key``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid

from idrecog.data.transforms import IMAGENET_MEAN, IMAGENET_STD

COLUMNS = ("original", "masked", "reconstruction", "recon. + visible")


def make_reconstruction_grid(
    original: Tensor,
    masked: Tensor,
    reconstruction: Tensor,
    pasted: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    titles: Sequence[str] = COLUMNS,
) -> Image.Image:
    """Four [N, 3, H, W] normalised batches -> an RGB picture, N rows x 4 columns, with a title row."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    cols = [
        (t.detach().float().cpu() * s + m).clamp(0, 1) for t in (original, masked, reconstruction, pasted)
    ]
    n, _, h, w = cols[0].shape
    tiles = torch.stack(cols, dim=1).reshape(n * 4, 3, h, w)  # row-major: image i's four views side by side
    grid = make_grid(tiles, nrow=4, padding=2, pad_value=1.0)
    body = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    header = 14
    out = Image.new("RGB", (body.width, body.height + header), (255, 255, 255))
    out.paste(body, (0, header))
    draw = ImageDraw.Draw(out)
    for j, title in enumerate(titles):
        draw.text((2 + j * (w + 2) + 2, 1), title, fill=(0, 0, 0))
    return out


class MAEReconstructionImages(Callback):
    """Save reconstruction pictures of a few fixed validation images.

    Args:
        every_n_steps: also draw during training every this many optimiser steps (0: only after validation).
        num_images: rows in the picture.
        seed: fixes the masks, so pictures from different steps are comparable.
        on_validation: draw at the end of every validation (not the sanity check).
        key: the W&B image key.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        num_images: int = 4,
        seed: int = 0,
        on_validation: bool = True,
        key: str = "mae/reconstruction",
    ) -> None:
        super().__init__()
        self.every_n_steps = int(every_n_steps)
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.on_validation = on_validation
        self.key = key
        self._images: Tensor | None = None
        self.saved: list[Path] = []

    def _fixed_images(self, trainer: Trainer) -> Tensor | None:
        if self._images is None:
            dm = trainer.datamodule
            if dm is not None and hasattr(dm, "fixed_images"):
                self._images = dm.fixed_images(self.num_images)
            else:
                loaders = trainer.val_dataloaders
                loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
                if loader is None:
                    return None
                batch = next(iter(loader))
                imgs = batch["image"] if isinstance(batch, dict) else batch
                self._images = imgs[: self.num_images]
        return self._images

    def _out_dir(self, trainer: Trainer) -> Path:
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / "images"

    @rank_zero_only
    def draw(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Draw and save the picture for the current step; returns its path."""
        imgs = self._fixed_images(trainer)
        if imgs is None or not hasattr(pl_module, "reconstruct"):
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            out: dict[str, Any] = pl_module.reconstruct(imgs.to(pl_module.device), seed=self.seed)
        finally:
            pl_module.train(was_training)
        picture = make_reconstruction_grid(imgs, out["masked"], out["reconstruction"], out["pasted"])
        path = self._out_dir(trainer) / f"step_{trainer.global_step:06d}.png"
        os.makedirs(path.parent, exist_ok=True)
        picture.save(path)
        self.saved.append(path)
        self._log_wandb(trainer, picture)
        return path

    def _log_wandb(self, trainer: Trainer, picture: Image.Image) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key=self.key, images=[picture], step=trainer.global_step, caption=[" | ".join(COLUMNS)]
                )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps > 0
            and step > 0
            and step % self.every_n_steps == 0
            and getattr(self, "_last", -1) != step
        ):
            self._last = step  # with gradient accumulation several batches end on the same step
            self.draw(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.draw(trainer, pl_module)
