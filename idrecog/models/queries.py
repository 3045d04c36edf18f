"""Task query providers: the query tokens each task owns in the task decoder.

A provider is built once by the model (``build``), which tells it how many tokens each task owns, and then
returns the tokens of the requested tasks, concatenated in the requested order:
``forward(tasks, batch_size, batch) -> [B, sum(Q_t), dim]``. The batch is passed through so that providers
which condition on text, associated frames (``batch["assoc"]``) or user features (``batch["user"]``) fit the
same interface.

Providers live in a small table (timm style)::

    @register_query_provider("mine")
    class MyQueries(TaskQueryProvider): ...

    create_query_provider("learned")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from idrecog.errors import ConfigError
from idrecog.registry import Registry
from idrecog.tasks.catalogue import USER_PARTS, TaskCatalogue

__all__ = [
    "COMBINES",
    "QUERY_PROVIDERS",
    "LearnedQueries",
    "TaskQueryProvider",
    "check_combine",
    "create_query_provider",
    "list_query_providers",
    "module_key",
    "register_query_provider",
    "zero_",
]

P = TypeVar("P", bound="type[TaskQueryProvider]")


def module_key(name: str) -> str:
    """A task name usable as a ``ModuleDict``/``ParameterDict`` key (``train``, ``type``... clash with methods)."""
    return f"{name}_" if hasattr(nn.ModuleDict, name) or hasattr(nn.ParameterDict, name) else name


COMBINES = ("film", "add")


def check_combine(combine: str) -> str:
    """Validate how a conditioned provider combines its per-token embeddings with the condition (text, frames,
    user data): ``film`` = ``token * (1 + cond)``, the condition's last projection starting at zero; ``add`` =
    ``cond + token`` with a random projection (the first design)."""
    if combine not in COMBINES:
        raise ConfigError(f"queries.combine must be one of {COMBINES}, got {combine!r}")
    return combine


def zero_(layer: nn.Linear) -> nn.Linear:
    """Zero a provider's last projection, so that a FiLM-conditioned design starts as its learned tokens alone
    and the condition's modulation grows in training."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class TaskQueryProvider(nn.Module):
    """Interface. Subclasses implement ``build`` and ``forward``; ``init_args`` lets checkpoints rebuild them."""

    init_args: dict[str, Any]
    #: ``forward`` reads associated frames (``batch["assoc"]``); the DataModule decodes frames only for providers
    #: that do (``UnifiedModule.setup`` tells it)
    consumes_frames: bool = False
    #: ``forward`` reads the sample's user information (``batch["user"]``)
    consumes_user: bool = False

    #: the parts of the user information ``forward`` reads, where it reads any (a converter can drop one)
    user_parts: frozenset[str] = frozenset(USER_PARTS)

    def reads(self, inputs: Iterable[str]) -> bool:
        """Whether the queries read every one of ``inputs`` (``flash``, ``angles``, ``user``, or a part of the
        user information: ``user.attributes``, ``user.behaviour``)."""
        have = {"flash", "angles"} if self.consumes_frames else set()
        if self.consumes_user:
            have |= {"user", *(f"user.{p}" for p in self.user_parts)}
        return set(inputs) <= have

    def __init__(self) -> None:
        super().__init__()
        self.init_args = {}
        self.query_counts: dict[str, int] = {}
        self.dim = 0

    def build(
        self,
        catalogue: TaskCatalogue,
        query_counts: dict[str, int],
        dim: int,
        encoder: nn.Module | None = None,
        user_spec: dict[str, Any] | None = None,
    ) -> None:
        """Create the parameters. ``query_counts``: task -> number of query tokens; ``dim``: token width;
        ``encoder``: the model's image encoder (for providers that encode associated frames); ``user_spec``: the
        fitted ``UserFeatureEncoder`` state (vocabulary sizes), None when unknown. UnifiedModel passes the last
        two only to providers whose ``build`` accepts them."""
        raise NotImplementedError

    def forward(self, tasks: list[str], batch_size: int, batch: dict[str, Any] | None = None) -> Tensor:
        """-> [B, sum(query_counts[t] for t in tasks), dim], the tasks' tokens in the given order."""
        raise NotImplementedError


QUERY_PROVIDERS: Registry[TaskQueryProvider] = Registry(
    "query provider",
    TaskQueryProvider,
    group="idrecog.query_providers",
    builtins="idrecog.models.builtin_queries",
)


def register_query_provider(name: str) -> Callable[[P], P]:
    """Class decorator: add a provider to the table under ``name``."""
    return QUERY_PROVIDERS.register(name)


def list_query_providers() -> list[str]:
    return QUERY_PROVIDERS.names()


def create_query_provider(name: str, **kwargs: Any) -> TaskQueryProvider:
    return QUERY_PROVIDERS.create(name, **kwargs)


@register_query_provider("learned")
class LearnedQueries(TaskQueryProvider):
    """One learned embedding per query token of each task (DETR / Q-Former style), init normal(0, std).

    Args:
        std: standard deviation of the initial embeddings.
    """

    def __init__(self, std: float = 0.02) -> None:
        super().__init__()
        self.init_args = {"std": std}
        self.std = std
        self.embeds = nn.ParameterDict()

    def build(self, catalogue: TaskCatalogue, query_counts: dict[str, int], dim: int, **_: Any) -> None:
        self.query_counts, self.dim = dict(query_counts), dim
        for task in catalogue.names:
            n = int(query_counts[task])
            if n < 1:
                raise ConfigError(f"task {task!r} must own at least one query token, got {n}")
            self.embeds[module_key(task)] = nn.Parameter(torch.randn(n, dim) * self.std)

    def forward(self, tasks: list[str], batch_size: int, batch: dict[str, Any] | None = None) -> Tensor:
        q = torch.cat([self.embeds[module_key(t)] for t in tasks], dim=0)
        return q.unsqueeze(0).expand(batch_size, -1, -1)

    def no_weight_decay(self) -> set[str]:
        """Token embeddings are not weight-decayed (timm convention: names relative to this module)."""
        return {f"embeds.{k}" for k in self.embeds}
