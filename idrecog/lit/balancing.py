"""Multi-task loss balancing: fixed weights, learned uncertainty (Kendall et al. 2018), dynamic weight
averaging (Liu et al. 2019). A small table: ``register_balancer`` / ``create_balancer`` / ``list_balancers``.

A balancer maps the per-task losses ``[T]`` (catalogue order) and which tasks have a labelled sample in the
batch (``task_present: bool [T]``) to the total loss and the effective weight of each task. Tasks absent from
the batch contribute exactly zero, and no state moves for them (no sync with the host: masks, not branches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from idrecog.errors import ConfigError
from idrecog.registry import Registry

__all__ = [
    "BALANCERS",
    "DWABalancer",
    "FixedBalancer",
    "LossBalancer",
    "UncertaintyBalancer",
    "create_balancer",
    "list_balancers",
    "register_balancer",
]

B = TypeVar("B", bound="type[LossBalancer]")


def register_balancer(name: str) -> Callable[[B], B]:
    """Class decorator: add a balancer to the table under ``name``."""
    return BALANCERS.register(name)


def list_balancers() -> list[str]:
    return BALANCERS.names()


def create_balancer(
    name: str, tasks: list[str], weights: Mapping[str, float] | None = None, **kwargs: Any
) -> LossBalancer:
    """``weights``: fixed per-task multipliers (default 1), applied by every strategy."""
    return BALANCERS.create(name, tasks, weights, field="model.balancing", **kwargs)


class LossBalancer(nn.Module):
    """Base: holds the fixed weights ``[T]``. ``forward(losses [T], task_present bool [T]) -> (total, weights [T])``."""

    def __init__(self, tasks: list[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ConfigError(f"task_weights names unknown tasks {unknown}; the catalogue has {tasks}")
        self.tasks = list(tasks)
        self.register_buffer(
            "fixed",
            torch.tensor([float(weights.get(t, 1.0)) for t in tasks], dtype=torch.float32),
            persistent=False,
        )

    def forward(self, losses: Tensor, task_present: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def epoch_end(self) -> None:
        """Called at the end of each training epoch (strategies with per-epoch state)."""

    @staticmethod
    def _masked(losses: Tensor, task_present: Tensor) -> Tensor:
        # where, not multiply: a NaN loss of an absent task must not leak into the total
        return torch.where(task_present, losses, torch.zeros_like(losses))


BALANCERS: Registry[LossBalancer] = Registry("balancer", LossBalancer, group="idrecog.balancers")


@register_balancer("fixed")
class FixedBalancer(LossBalancer):
    """total = sum_t w_t * L_t over present tasks."""

    def forward(self, losses: Tensor, task_present: Tensor) -> tuple[Tensor, Tensor]:
        w = self.fixed * task_present.to(self.fixed.dtype)
        return (w * self._masked(losses, task_present)).sum(), w


@register_balancer("uncertainty")
class UncertaintyBalancer(LossBalancer):
    """Kendall et al.: learned log-variances s_t; total = sum_t w_t (exp(-s_t) L_t + s_t) / 2 over present
    tasks. The effective weight reported is w_t exp(-s_t) / 2."""

    def __init__(self, tasks: list[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks, weights)
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)))

    def no_weight_decay(self) -> set[str]:
        return {"log_vars"}

    def forward(self, losses: Tensor, task_present: Tensor) -> tuple[Tensor, Tensor]:
        s = self.log_vars.to(losses.dtype)
        terms = 0.5 * (torch.exp(-s) * self._masked(losses, task_present) + s)
        # absent tasks: no loss and no pull on s (its regulariser alone would drive s to -inf)
        total = (self.fixed * torch.where(task_present, terms, torch.zeros_like(terms))).sum()
        w = self.fixed * 0.5 * torch.exp(-s.detach()) * task_present.to(s.dtype)
        return total, w


@register_balancer("dwa")
class DWABalancer(LossBalancer):
    """Liu et al. (MTAN): w_t = T * softmax_t(r_t / temperature), r_t = L_t(e-1) / L_t(e-2) from the mean
    training loss of the last two epochs (1 for the first two epochs, and for a task without loss in them).

    Args:
        temperature: softmax temperature (the paper uses 2).
    """

    def __init__(
        self, tasks: list[str], weights: Mapping[str, float] | None = None, temperature: float = 2.0
    ) -> None:
        super().__init__(tasks, weights)
        if temperature <= 0:
            raise ConfigError(f"dwa temperature must be > 0, got {temperature}")
        self.temperature = temperature
        n = len(tasks)
        self.register_buffer("loss_sum", torch.zeros(n))
        self.register_buffer("loss_count", torch.zeros(n))
        # mean epoch losses of the last two epochs (NaN: unknown)
        self.register_buffer("history", torch.full((2, n), float("nan")))
        self.register_buffer("dyn", torch.ones(n))

    def forward(self, losses: Tensor, task_present: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            m = task_present.to(self.loss_sum.dtype)
            self.loss_sum += self._masked(losses.detach().float(), task_present) * m
            self.loss_count += m
        w = self.fixed * self.dyn.to(losses.dtype) * task_present.to(losses.dtype)
        return (w * self._masked(losses, task_present)).sum(), w

    def epoch_end(self) -> None:
        mean = torch.where(self.loss_count > 0, self.loss_sum / self.loss_count.clamp(min=1), float("nan"))
        self.history.copy_(torch.stack([self.history[1], mean]))
        ratio = self.history[1] / self.history[0]
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        self.dyn.copy_(len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0))
        self.loss_sum.zero_()
        self.loss_count.zero_()
