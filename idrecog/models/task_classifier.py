"""The task classifier network: which catalogue tasks apply to an image (multi-label logits).

A backbone (any timm model, pooled features, or the shared :class:`~idrecog.models.encoder.ViTEncoder`,
mean-pooled patch tokens), dropout and a linear head. Trained by :class:`idrecog.lit.task_classifier.
TaskClassifierModule`; run by the ``classifier`` task resolver (:mod:`idrecog.data.resolution.classifier`),
which rebuilds it from a checkpoint with :meth:`TaskClassifier.from_checkpoint` (no Lightning module needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idrecog.errors import ConfigError
from idrecog.models.encoder import ViTEncoder
from idrecog.models.unified import module_from_config
from idrecog.tasks.catalogue import TaskCatalogue, coerce_catalogue

__all__ = ["TaskClassifier"]


class TaskClassifier(nn.Module):
    """``forward(images [N, 3, H, W]) -> logits [N, T]``, one logit per catalogue task.

    Args:
        num_tasks: T, the catalogue's task count.
        backbone: a timm model name, built with ``pretrained=False, num_classes=0`` (when ``encoder`` is None).
        encoder: the shared ViT encoder instead (its ``img_size`` is the input size).
        input_size: (H, W) the timm backbone sees; other sizes are resized in :meth:`forward`.
        backbone_kwargs: further keyword arguments of ``timm.create_model``.
        drop_rate: dropout before the linear head.
    """

    def __init__(
        self,
        num_tasks: int,
        backbone: str = "resnet18",
        encoder: ViTEncoder | None = None,
        input_size: tuple[int, int] = (160, 256),
        backbone_kwargs: Mapping[str, Any] | None = None,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if encoder is not None:
            self.backbone: nn.Module = encoder
            num_features = encoder.embed_dim
            input_size = encoder.img_size
        else:
            try:
                self.backbone = timm.create_model(
                    backbone, pretrained=False, num_classes=0, **dict(backbone_kwargs or {})
                )
            except RuntimeError as e:  # timm: "Unknown model (...)"
                raise ConfigError(f"model.backbone {backbone!r}: {e} (see timm.list_models())") from None
            num_features = int(self.backbone.num_features)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(num_features, num_tasks))

    @property
    def uses_encoder(self) -> bool:
        return isinstance(self.backbone, ViTEncoder)

    def forward(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] (ImageNet-normalised; resized to ``input_size`` when different) -> logits [N, T]."""
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(
                images, size=self.input_size, mode="bilinear", antialias=True, align_corners=False
            )
        if self.uses_encoder:
            feats = self.backbone(images).mean(dim=1)  # [N, L, D] -> [N, D]
        else:
            feats = self.backbone(images)  # [N, D] pooled
        return self.head(feats)

    @torch.inference_mode()
    def predict_proba(self, images: Tensor) -> Tensor:
        """images: [N, 3, H, W] -> probabilities [N, T] (catalogue order)."""
        return torch.sigmoid(self(images).float())

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def network_state(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The network's weights from a ``TaskClassifierModule`` state dict (keys under ``net.``; checkpoints
        written before the network had its own module keep them at the top level)."""
        if any(k.startswith("net.") for k in state_dict):
            return {k.removeprefix("net."): v for k, v in state_dict.items() if k.startswith("net.")}
        return {k: v for k, v in state_dict.items() if k.startswith(("backbone.", "head."))}

    @classmethod
    def from_checkpoint(
        cls, ckpt: Mapping[str, Any], where: str = "<checkpoint>"
    ) -> tuple[TaskClassifier, TaskCatalogue]:
        """Rebuild the network from a ``TaskClassifierModule`` checkpoint dict -> (network in eval mode, the
        catalogue it was trained on); a file that is not one raises ``ConfigError``."""
        hp = dict(ckpt.get("hyper_parameters") or {})
        if "state_dict" not in ckpt or "catalogue" not in hp or "input_size" not in hp:
            raise ConfigError(
                f"{where}: not a task-classifier checkpoint (no state_dict, catalogue or input_size)"
            )
        catalogue = coerce_catalogue(dict(hp["catalogue"]))
        net = cls(
            len(catalogue),
            backbone=hp.get("backbone") or "resnet18",
            encoder=module_from_config(hp.get("encoder"), ViTEncoder, "encoder"),
            input_size=tuple(hp["input_size"]),
            backbone_kwargs=hp.get("backbone_kwargs"),
            drop_rate=float(hp.get("drop_rate", 0.0)),
        )
        net.load_state_dict(cls.network_state(ckpt["state_dict"]), strict=True)
        return net.eval(), catalogue
