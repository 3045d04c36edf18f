"""The task decoder: Q-Former / DETR-style transformer decoder over task query tokens.

Each layer (pre-norm): query self-attention -> cross-attention to the image tokens -> MLP. Attention goes
through ``torch.nn.functional.scaled_dot_product_attention`` so fused (flash / memory-efficient) kernels run on
GPU. Image tokens are projected from the encoder width to ``dim`` when they differ and get a fixed 2-D sin-cos
(or learned) position embedding on the keys, as in DETR.

With ``cross_task_attention=False`` self-attention is block-diagonal per task: a task's queries attend only to
its own queries, so what a task outputs does not depend on which other tasks run in the same pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import Tensor, nn

from idrecog.errors import ConfigError

__all__ = ["Attention", "DecoderLayer", "TaskDecoder", "block_diagonal_mask"]

MEMORY_POS = ("sincos", "learned", "none")


def block_diagonal_mask(slices: Sequence[slice], total: int, device: torch.device | None = None) -> Tensor:
    """Boolean [Q, Q] mask, True where query i may attend to query j (same task). SDPA's bool-mask convention."""
    owner = torch.empty(total, dtype=torch.long, device=device)
    for i, s in enumerate(slices):
        owner[s] = i
    return owner[:, None] == owner[None, :]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v inputs. q: [B, Q, D], k/v: [B, L, D] -> [B, Q, D]."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"decoder dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = q.shape
        out = F.scaled_dot_product_attention(
            self._heads(self.q(q)),
            self._heads(self.k(k)),
            self._heads(self.v(v)),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DecoderLayer(nn.Module):
    """Pre-norm: x += SelfAttn(LN x); x += CrossAttn(LN x, memory + pos, memory); x += MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_pos: Tensor | None,
        self_mask: Tensor | None,
        cross_mask: Tensor | None = None,
    ) -> Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, h, attn_mask=self_mask))
        h = self.norm2(x)
        keys = memory if memory_pos is None else memory + memory_pos
        x = x + self.drop(self.cross_attn(h, keys, memory, attn_mask=cross_mask))
        return x + self.mlp(self.norm3(x))


class TaskDecoder(nn.Module):
    """Transformer decoder over task queries.

    Args:
        dim: query token width (heads are built for this width).
        depth: number of decoder layers.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        dropout: dropout in attention, MLP and residual branches.
        cross_task_attention: let queries of different tasks attend to each other (False: block-diagonal).
        memory_pos: position information of the image tokens: ``sincos`` (fixed 2-D), ``learned`` or ``none``.
    """

    def __init__(
        self,
        dim: int = 192,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        cross_task_attention: bool = False,
        memory_pos: str = "sincos",
    ) -> None:
        super().__init__()
        if memory_pos not in MEMORY_POS:
            raise ConfigError(f"memory_pos must be one of {MEMORY_POS}, got {memory_pos!r}")
        if memory_pos == "sincos" and dim % 4:
            raise ConfigError(f"memory_pos='sincos' needs dim divisible by 4, got {dim}")
        self.init_args: dict[str, Any] = {
            "dim": dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "dropout": dropout,
            "cross_task_attention": cross_task_attention,
            "memory_pos": memory_pos,
        }
        self.dim = dim
        self.cross_task_attention = cross_task_attention
        self.memory_pos_kind = memory_pos
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.memory_proj: nn.Module = nn.Identity()
        self.memory_norm = nn.LayerNorm(dim)
        self.grid_size: tuple[int, int] = (0, 0)

    def build(self, memory_dim: int, grid_size: tuple[int, int]) -> None:
        """Called once by the model: the encoder width and the patch grid (h, w) of the memory tokens."""
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        if memory_dim != self.dim:
            self.memory_proj = nn.Linear(memory_dim, self.dim)
        n = self.grid_size[0] * self.grid_size[1]
        if self.memory_pos_kind == "sincos":
            pos = build_sincos2d_pos_embed(list(self.grid_size), self.dim).unsqueeze(0)
            self.register_buffer("memory_pos", pos, persistent=False)
        elif self.memory_pos_kind == "learned":
            self.memory_pos = nn.Parameter(torch.randn(1, n, self.dim) * 0.02)
        else:
            self.memory_pos = None

    def no_weight_decay(self) -> set[str]:
        return {"memory_pos"} if self.memory_pos_kind == "learned" else set()

    def forward(
        self,
        queries: Tensor,
        memory: Tensor,
        task_slices: Mapping[str, slice] | Sequence[slice],
        extra: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """queries: [B, Q, dim]; memory: [B, L, enc_dim] image tokens (L = h * w, row-major) -> [B, Q, dim].

        task_slices: each task's token range in ``queries`` (a mapping task -> slice, or a list of slices).
        extra: more memory for some queries only, (tokens [B, L_d, dim], their key position [1, L_d, dim],
        cross-attention mask bool [Q, L + L_d], True = may attend), e.g. the detail branch's tokens.
        """
        slices = list(task_slices.values()) if isinstance(task_slices, Mapping) else list(task_slices)
        mask = None
        if not self.cross_task_attention and len(slices) > 1:
            mask = block_diagonal_mask(slices, queries.shape[1], queries.device)
        mem = self.memory_norm(self.memory_proj(memory))
        pos = self.memory_pos
        if pos is not None and pos.shape[1] != mem.shape[1]:
            raise ConfigError(
                f"the decoder was built for {pos.shape[1]} image tokens (grid {self.grid_size}), got {mem.shape[1]}"
            )
        cross_mask = None
        if extra is not None:
            tokens, extra_pos, cross_mask = extra
            if pos is None:
                pos = torch.zeros_like(mem[:1])
            mem = torch.cat([mem, tokens], dim=1)
            pos = torch.cat([pos.to(mem.dtype), extra_pos.to(mem.dtype)], dim=1)
        x = queries
        for layer in self.layers:
            x = layer(x, mem, pos, mask, cross_mask)
        return self.norm(x)
