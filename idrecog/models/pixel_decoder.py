"""Pixel decoder: turns the encoder's patch tokens into a stride-4 feature map for dense heads.

Built only when some task type sets ``needs_pixel_features`` (segmentation, MaskFormer style: the task's mask
embeddings are dotted with these features).

Design: each patch token predicts the features of its (p/4 x p/4) sub-pixels with one linear layer, rearranged by
pixel shuffle, then a per-pixel linear layer widens them to the decoder width (the "linear upsampling" of SETR/ViTDet-style
simple heads). It is all matrix products: on CPU the stride-4 3x3 convolutions of a conv decoder cost several
times the whole ViT-Tiny encoder (convolution backward dominated the profile), and global context is already in
the tokens.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["PixelDecoder"]


class PixelDecoder(nn.Module):
    """tokens: [B, L, in_dim] (L = h * w, row-major) -> features [B, dim, 4h, 4w] (= H/4, W/4 for patch 16).

    Args:
        in_dim: encoder width.
        dim: output channels (the task decoder width, so that mask embeddings can be dotted with them).
        grid_size: the patch grid (h, w).
        hidden_dim: channels per sub-pixel before widening (default ``min(dim, 32)``): the widening runs at
            stride 4, so its cost is what grows with this width.
        upscale: sub-pixels per patch side (4: stride-4 features for patch-16 ViTs).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        grid_size: tuple[int, int],
        hidden_dim: int | None = None,
        upscale: int = 4,
    ) -> None:
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.upscale = int(upscale)
        self.hidden = int(hidden_dim or min(dim, 32))
        self.norm = nn.LayerNorm(in_dim)
        self.expand = nn.Linear(in_dim, self.hidden * self.upscale**2)
        self.widen = nn.Sequential(nn.LayerNorm(self.hidden), nn.Linear(self.hidden, dim))

    @property
    def proj(self) -> nn.Linear:
        """The last, widening layer (hidden -> dim), applied per pixel."""
        return self.widen[1]

    def forward_hidden(self, tokens: Tensor) -> Tensor:
        """tokens: [B, L, in_dim] -> narrow normalised features [B, 4h, 4w, hidden] (channels last), before
        :attr:`proj`. Heads fold ``proj`` into their embeddings (``HeadContext.dot_pixels``)."""
        b, _, _ = tokens.shape
        h, w = self.grid_size
        r = self.upscale
        x = self.expand(self.norm(tokens))  # [B, L, C * r * r]
        x = x.transpose(1, 2).reshape(b, self.hidden * r * r, h, w)
        x = F.pixel_shuffle(x, r)  # [B, C, r h, r w]
        return self.widen[0](F.gelu(x.permute(0, 2, 3, 1)))  # per pixel, channels last

    def project(self, hidden: Tensor) -> Tensor:
        """hidden: [B, 4h, 4w, hidden] (``forward_hidden``) -> [B, dim, 4h, 4w]."""
        return self.proj(hidden).permute(0, 3, 1, 2).contiguous()

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: [B, L, in_dim] -> [B, dim, 4h, 4w]."""
        return self.project(self.forward_hidden(tokens))
