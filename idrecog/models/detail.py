"""``DetailBranch``: high-resolution local features for the tasks that need detail.

A ViT reads the image in 16-pixel patches: a 3-pixel re-print halo, a re-rendered line of text or a screen's moiré
is averaged away inside one token. The detail branch is a light CNN (any timm model with ``features_only``) that
keeps a finer grid, stride 8 by default (20 x 32 cells at 160 x 256, against the ViT's 10 x 16). Its cells join the
task decoder's memory for the queries of the tasks named in ``tasks`` only (an attention mask keeps the others
out), so only those tasks pay for reading them and the encoder stays swappable and MAE-pretrainable.

    images [B, 3, H, W] -> CNN features [B, C, H/s, W/s] -> 1x1 projection, LayerNorm -> tokens [B, (H/s)(W/s), D]

The tokens get the fixed 2-D sin-cos position embedding of their own grid on the keys, as the image tokens do.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import Tensor, nn

from idrecog.errors import ConfigError

__all__ = ["DetailBranch"]


class DetailBranch(nn.Module):
    """Fine-grid CNN features as extra decoder memory for ``tasks``.

    Args:
        tasks: the tasks whose queries read the detail tokens (e.g. ``[tampering, presentation_attack]``).
        backbone: a timm CNN built with ``features_only=True`` and ``pretrained=False``.
        stride: the feature level to read (4, 8, 16 or 32: the backbone's reduction of that level).
        backbone_kwargs: further keyword arguments of ``timm.create_model``.
    """

    def __init__(
        self,
        tasks: list[str],
        backbone: str = "mobilenetv3_small_100",
        stride: int = 8,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("detail.tasks: name at least one task whose queries read the detail features")
        self.init_args: dict[str, Any] = {
            "tasks": list(tasks),
            "backbone": backbone,
            "stride": stride,
            "backbone_kwargs": dict(backbone_kwargs or {}),
        }
        self.tasks = list(tasks)
        self.stride = int(stride)
        try:
            probe = timm.create_model(
                backbone, pretrained=False, features_only=True, **dict(backbone_kwargs or {})
            )
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ConfigError(f"detail.backbone {backbone!r}: {e} (see timm.list_models())") from None
        reductions = probe.feature_info.reduction()
        if self.stride not in reductions:
            raise ConfigError(f"detail.stride {stride}: {backbone} offers strides {reductions}")
        index = reductions.index(self.stride)
        # build only up to the level read: later stages would cost and never be used
        self.cnn = timm.create_model(
            backbone,
            pretrained=False,
            features_only=True,
            out_indices=(index,),
            **dict(backbone_kwargs or {}),
        )
        self.channels = int(self.cnn.feature_info.channels()[-1])
        self.proj: nn.Module = nn.Identity()
        self.norm: nn.Module = nn.Identity()
        self.grid_size: tuple[int, int] = (0, 0)

    def build(self, dim: int, img_size: tuple[int, int], task_names: list[str]) -> None:
        """Called once by the model: the decoder width, the input size and the catalogue's tasks."""
        unknown = sorted(set(self.tasks) - set(task_names))
        if unknown:
            raise ConfigError(
                f"detail.tasks names {unknown}, which are not tasks of the catalogue {task_names}"
            )
        h, w = (int(v) for v in img_size)
        if h % self.stride or w % self.stride:
            raise ConfigError(f"detail.stride {self.stride} must divide the image size {h} x {w}")
        self.grid_size = (h // self.stride, w // self.stride)
        self.proj = nn.Conv2d(self.channels, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)
        pos = build_sincos2d_pos_embed(list(self.grid_size), dim).unsqueeze(0)
        self.register_buffer("pos", pos, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """images: [B, 3, H, W] -> tokens [B, (H/s) * (W/s), dim] (row-major), without position embedding."""
        feats = self.proj(self.cnn(images)[-1])  # [B, D, H/s, W/s]
        if tuple(feats.shape[-2:]) != self.grid_size:
            raise ConfigError(
                f"the detail branch was built for a {self.grid_size} grid, got {tuple(feats.shape[-2:])}"
            )
        return self.norm(feats.flatten(2).transpose(1, 2))

    def reads(self, tasks: list[str]) -> bool:
        return any(t in self.tasks for t in tasks)


def detail_mask(
    task_slices: dict[str, slice],
    detail_tasks: list[str],
    num_queries: int,
    n_image: int,
    n_detail: int,
    device: torch.device,
) -> Tensor:
    """Boolean cross-attention mask [Q, L + L_d]: every query sees the image tokens; only the queries of
    ``detail_tasks`` see the detail tokens (SDPA's convention: True = may attend)."""
    mask = torch.ones(num_queries, n_image + n_detail, dtype=torch.bool, device=device)
    mask[:, n_image:] = False
    for t, s in task_slices.items():
        if t in detail_tasks:
            mask[s, n_image:] = True
    return mask
