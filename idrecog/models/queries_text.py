"""``TextQueries``: each task's query tokens from its catalogue ``query_text``, read by a transformers encoder.

``proj(mean_pool(text_encoder(query_text))) + slot_offset[k]`` for the task's k-th query token, so a task that
owns N tokens (detection) gets N distinct tokens that share the text's meaning. The text is constant, so with a
frozen encoder (the default) the sentence embeddings are computed once, in ``build``, and cached in a
non-persistent buffer: checkpoints hold only the projection and the offsets, and a reloaded model re-reads the
encoder from ``model_dir``. With ``freeze=False`` the encoder is a trainable submodule and runs every forward.

``combine`` (default ``film``): the k-th token is ``offset[k] * (1 + proj(text))`` with the projection's last
layer starting at zero, so training starts from the offsets alone (the learned design: distinct, nearly orthogonal
tokens) and the text modulates them. ``add`` is the first design, ``proj(text) + offset[k]``. Why: the sentence
embedding is the same for all of a task's tokens, and an added shared vector dominates the small offsets - at
initialisation (cosine similarity 0.999 between card_mask's 4 mask tokens) and, even from a zero start, after 5
AdamW steps - so a segmentation task's tokens had to be pulled apart before they could segment (card_mask mIoU
0.61 vs 0.73 for learned queries after 300 CPU steps). A shared element-wise scale keeps independent tokens
nearly orthogonal whatever its size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from idrecog.errors import ConfigError
from idrecog.models.queries import (
    TaskQueryProvider,
    check_combine,
    module_key,
    register_query_provider,
    zero_,
)
from idrecog.tasks.catalogue import TaskCatalogue
from idrecog.text import encode_texts, load_text_encoder, mean_pool

__all__ = ["TextQueries"]


@register_query_provider("text")
class TextQueries(TaskQueryProvider):
    """Query tokens from the tasks' query texts.

    Args:
        model_dir: a local transformers model folder; None: the packaged all-MiniLM-L6-v2 (``idrecog[text]``).
        freeze: keep the text encoder frozen (embeddings cached once, not in checkpoints).
        max_length: token limit of a query text.
        std: init std of the per-slot offsets.
        combine: ``film`` (default) or ``add``, how the text enters each token (see the module docstring).
    """

    def __init__(
        self,
        model_dir: str | None = None,
        freeze: bool = True,
        max_length: int = 64,
        std: float = 0.02,
        combine: str = "film",
    ) -> None:
        super().__init__()
        self.init_args = {
            "model_dir": model_dir,
            "freeze": freeze,
            "max_length": max_length,
            "std": std,
            "combine": check_combine(combine),
        }
        self.model_dir, self.freeze, self.max_length, self.std = model_dir, freeze, max_length, std
        self.combine = combine
        self.tasks: list[str] = []
        self.texts: list[str] = []
        self.offsets = nn.ParameterDict()
        self.proj: nn.Module = nn.Identity()
        self.text_encoder: nn.Module | None = None
        self._tokenizer: Any = None
        #: how many times the text encoder ran (tests check the cache)
        self.encoder_calls = 0

    def build(self, catalogue: TaskCatalogue, query_counts: dict[str, int], dim: int, **_: Any) -> None:
        self.query_counts, self.dim = dict(query_counts), dim
        self.tasks = list(catalogue.names)
        self.texts = [catalogue[t].query_text for t in self.tasks]
        tok, enc = load_text_encoder(self.model_dir)
        self._tokenizer = tok
        hidden = int(enc.config.hidden_size)
        self.proj = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        if self.combine == "film":
            zero_(self.proj[-1])
        for task in self.tasks:
            n = int(query_counts[task])
            if n < 1:
                raise ConfigError(f"task {task!r} must own at least one query token, got {n}")
            self.offsets[module_key(task)] = nn.Parameter(torch.randn(n, dim) * self.std)
        if self.freeze:
            enc.requires_grad_(False)
            self.register_buffer("text_emb", self._embed(enc), persistent=False)  # [T, H]
            # the encoder is not kept: the cache is all the frozen design needs
        else:
            self.text_encoder = enc

    def _embed(self, enc: nn.Module) -> Tensor:
        """-> [T, H] mean-pooled embeddings of the catalogue's query texts (one batched encoder call)."""
        self.encoder_calls += 1
        with torch.set_grad_enabled(not self.freeze and torch.is_grad_enabled()):
            states, mask = encode_texts(self._tokenizer, enc, self.texts, self.max_length)
            return mean_pool(states, mask)

    def task_embeddings(self) -> Tensor:
        """[T, H] sentence embeddings in catalogue order (cached when frozen)."""
        if self.text_encoder is None:
            return self.text_emb
        return self._embed(self.text_encoder)

    def forward(self, tasks: list[str], batch_size: int, batch: dict[str, Any] | None = None) -> Tensor:
        """-> [B, sum(Q_t), dim]: the same tokens for every sample (the text does not depend on the image)."""
        emb = self.proj(self.task_embeddings())  # [T, dim]
        index = {t: i for i, t in enumerate(self.tasks)}
        if self.combine == "film":
            parts = [self.offsets[module_key(t)] * (1.0 + emb[index[t]]) for t in tasks]
        else:
            parts = [emb[index[t]].unsqueeze(0) + self.offsets[module_key(t)] for t in tasks]
        q = torch.cat(parts, dim=0)
        return q.unsqueeze(0).expand(batch_size, -1, -1)

    def no_weight_decay(self) -> set[str]:
        return {f"offsets.{k}" for k in self.offsets}
