"""Pixel decoder: turns the encoder's patch tokens into a stride-4 feature map for dense heads.

Built only when some task type sets ``needs_pixel_features`` (segmentation, MaskFormer style: the task's mask
embeddings are dotted with these features).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

__all__ = ["PixelDecoder"]


def _groups(channels: int, max_groups: int = 32) -> int:
    return math.gcd(channels, max_groups)


def _conv_gn_gelu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(_groups(cout), cout), nn.GELU()
    )


class PixelDecoder(nn.Module):
    """tokens: [B, L, in_dim] (L = h * w, row-major) -> features [B, dim, 4h, 4w] (= H/4, W/4 for patch 16).

    Args:
        in_dim: encoder width.
        dim: output channels (the task decoder width, so that mask embeddings can be dotted with them).
        grid_size: the patch grid (h, w).
    """

    def __init__(self, in_dim: int, dim: int, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.stem = _conv_gn_gelu(in_dim, dim, 1)
        # two x2 stages; bilinear upsampling + 3x3 conv avoids transposed-conv checkerboards
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_gn_gelu(dim, dim, 3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_gn_gelu(dim, dim, 3),
        )
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        b, _, c = tokens.shape
        h, w = self.grid_size
        x = tokens.transpose(1, 2).reshape(b, c, h, w)
        return self.out(self.up(self.stem(x)))
