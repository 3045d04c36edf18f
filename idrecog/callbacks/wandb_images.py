"""Sample predictions as ``wandb.Image`` each validation epoch, drawn by the task types.

The first validation batch of every epoch (after the sanity check) is run again through the model for at most
``max_images`` samples. Each task type draws its prediction (``TaskType.draw_output``) and, where labelled, its
ground truth (``draw_target``) on a :class:`~idrecog.tasks.drawing.Canvas`: masks and boxes become W&B's
toggleable ``{task}/prediction`` and ``{task}/ground_truth`` layers, classes and values caption lines. Without a
``WandbLogger`` the callback does nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor

from idrecog.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from idrecog.tasks.drawing import Canvas

__all__ = ["WandbPredictionImages", "slice_batch"]


def slice_batch(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch in the batch contract (tensors, lists, nested dicts)."""
    if isinstance(batch, Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: slice_batch(v, n) for k, v in batch.items()}
    if isinstance(batch, list):
        return batch[:n]
    return batch


def _to_uint8(img: Tensor) -> np.ndarray:
    """img: [3, H, W] normalised -> uint8 [H, W, 3]."""
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (img.detach().float().cpu() * s + m).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class WandbPredictionImages(Callback):
    """Log up to ``max_images`` validation predictions per epoch to W&B.

    Args:
        max_images: cap per epoch.
        every_n_epochs: log every this many validation epochs.
        key: the W&B key of the image list.
    """

    def __init__(self, max_images: int = 8, every_n_epochs: int = 1, key: str = "val/predictions") -> None:
        super().__init__()
        self.max_images = int(max_images)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.key = key
        #: the number of images logged at the last epoch (tests)
        self.logged = 0

    @staticmethod
    def _wandb_loggers(trainer: Trainer) -> list[Any]:
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            batch_idx != 0
            or dataloader_idx != 0
            or trainer.sanity_checking
            or trainer.current_epoch % self.every_n_epochs
            or not self._wandb_loggers(trainer)
        ):
            return
        self.log_predictions(trainer, pl_module, batch)

    @rank_zero_only
    def log_predictions(self, trainer: Trainer, pl_module: LightningModule, batch: dict[str, Any]) -> None:

        n = min(self.max_images, int(batch["image"].shape[0]))
        sub = slice_batch(batch, n)
        with torch.no_grad():
            out = pl_module(sub["image"], batch=sub, route="known")["outputs"]
        cat = pl_module.catalogue
        task_types = pl_module.task_types
        post = {t: task_types[t].postprocess(out[t]) for t in cat.names}
        applies = sub.get("applies")
        present = sub.get("present")
        ids = sub.get("ids") or [str(j) for j in range(n)]
        images = []
        for j in range(n):
            rgb = Image.fromarray(_to_uint8(sub["image"][j]))
            pred, truth = Canvas(rgb, layer="prediction"), Canvas(rgb, layer="ground_truth")
            for i, spec in enumerate(cat):
                if applies is not None and not bool(applies[j, i]):
                    continue
                tt = task_types[spec.name]
                tt.draw_output(pred, post[spec.name][j])
                if present is not None and bool(present[j, i]):
                    tt.draw_target(truth, sub["targets"][spec.name][j])  # a collated row
            images.append(pred.wandb_image(extra=truth, caption=[str(ids[j])]))
        for lg in self._wandb_loggers(trainer):
            lg.experiment.log({self.key: images, "trainer/global_step": trainer.global_step})
        self.logged = len(images)
