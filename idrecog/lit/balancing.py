"""Multi-task loss balancing. A small table: ``register_balancer`` / ``create_balancer`` / ``list_balancers``.

Loss balancers: fixed weights, learned uncertainty (Kendall et al. 2018), dynamic weight averaging (Liu et al.
2019), random loss weighting (RLW, Lin et al. 2022), the geometric loss strategy (GLS, Chennupati et al. 2019).
Gradient balancers (:class:`GradientBalancer`), which see each task's gradient on the shared representation:
PCGrad (Yu et al. 2020), CAGrad (Liu et al. 2021), GradNorm (Chen et al. 2018).

A balancer maps the per-task losses ``[T]`` (catalogue order) and which tasks have a labelled sample in the
batch (``task_present: bool [T]``) to the total loss and the effective weight of each task. Tasks absent from
the batch contribute exactly zero, and no state moves for them (loss balancers do not sync with the host:
masks, not branches; gradient balancers move a ``[T, T]`` Gram matrix to the host once a step).
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
    "CAGradBalancer",
    "DWABalancer",
    "FixedBalancer",
    "GLSBalancer",
    "GradNormBalancer",
    "GradientBalancer",
    "LossBalancer",
    "PCGradBalancer",
    "RLWBalancer",
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

    #: whether ``forward`` takes the shared representation (``shared=``) to see the task gradients
    uses_gradients: bool = False

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


# ---------------------------------------------------------------------------------------------- gradient balancers
def task_gradients(losses: Tensor, task_present: Tensor, shared: Tensor) -> Tensor:
    """Per task, the gradient of its loss on the shared representation, flattened: ``[T, shared.numel()]``
    (float32; zero rows for absent tasks). One partial backward per present task, through the decoder and the
    heads only: the encoder below ``shared`` is not visited."""
    rows = []
    present = task_present.tolist()  # one host sync: which tasks get a backward
    for t in range(losses.shape[0]):
        g = None
        if present[t] and losses[t].requires_grad:
            (g,) = torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros(shared.numel(), device=shared.device) if g is None else g.float().reshape(-1))
    return torch.stack(rows)


def _with_shared_gradient(total: Tensor, shared: Tensor, shift: Tensor) -> Tensor:
    """``total`` whose backward adds ``shift`` to the gradient reaching ``shared`` (the value is unchanged):
    the combined task gradient replaces the weighted sum on the shared representation within one ordinary
    ``backward``, so Lightning's automatic optimisation, gradient accumulation and DDP work as they are."""
    nudge = (shared * shift.detach().view_as(shared).to(shared.dtype)).sum()
    return total + (nudge - nudge.detach())


class GradientBalancer(LossBalancer):
    """A balancer that sees each task's gradient on the shared representation (the encoder's output tokens,
    which every task head reads through the decoder and the pixel decoder; docs/architecture.md, "Losses and
    partial labels").

    ``forward(losses, task_present, shared)``: with ``shared`` (training, a tensor in the graph of every loss)
    the per-task gradients ``g_t`` of ``fixed_t * L_t`` on it are taken, and :meth:`combine` turns their Gram
    matrix into ``alpha`` (the shared gradient is ``sum_t alpha_t g_t``) and ``beta`` (the weights of the task
    losses everywhere else: heads, queries, decoder). Every method here gives a combination of the task
    gradients, so only the ``[T, T]`` Gram matrix goes to the host. The weights returned are ``alpha``.
    Without ``shared`` (validation, test) the fixed weights are used.
    """

    uses_gradients = True

    def __init__(self, tasks: list[str], weights: Mapping[str, float] | None = None, seed: int = 0) -> None:
        super().__init__(tasks, weights)
        self.seed = int(seed)
        # training steps seen: with ``seed`` it makes the random draws deterministic and resumable
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))

    def combine(self, gram: Tensor, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """``gram``: float64 ``[T, T]`` on the CPU (``g_i . g_j``); ``losses``: detached ``[T]`` on the CPU;
        ``present`` bool ``[T]`` -> (alpha [T], beta [T]) on the CPU, zero for absent tasks."""
        raise NotImplementedError

    def forward(
        self, losses: Tensor, task_present: Tensor, shared: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        present = task_present.bool()
        masked = self._masked(losses, present)
        if shared is None or not torch.is_grad_enabled() or not shared.requires_grad:
            w = self.fixed * present.to(self.fixed.dtype)
            return (w * masked).sum(), w
        scaled = self.fixed.to(losses.dtype) * masked
        grads = task_gradients(scaled, present, shared)  # [T, N]
        gram = (grads @ grads.T).double().cpu()
        if not torch.isfinite(gram).all():  # a non-finite loss: the step is skipped by the caller
            w = self.fixed * present.to(self.fixed.dtype)
            return (w * masked).sum(), w
        pres = present.cpu()
        alpha, beta = self.combine(gram, scaled.detach().double().cpu(), pres)
        alpha = torch.where(pres, alpha, 0.0).to(grads)
        beta = torch.where(pres, beta, 0.0).to(grads)
        if self.training:
            self.steps += 1
        shift = ((alpha - beta)[:, None] * grads).sum(0)
        total = _with_shared_gradient((beta.to(losses.dtype) * scaled).sum(), shared, shift)
        return total + self._extra_objective(gram, scaled.detach(), pres), alpha * self.fixed

    def _extra_objective(self, gram: Tensor, losses: Tensor, present: Tensor) -> Tensor:
        """A term whose value is 0 and whose gradient trains the balancer's own parameters (GradNorm)."""
        return torch.zeros((), device=self.fixed.device)


@register_balancer("pcgrad")
class PCGradBalancer(GradientBalancer):
    """PCGrad (Yu et al. 2020, "Gradient surgery for multi-task learning"): each task's gradient is projected
    off the normal plane of every other task's gradient it conflicts with (negative inner product), in a random
    order per step; the shared gradient is the sum of the projected gradients. The task-specific parts keep
    their own loss's gradient (``beta`` = the fixed weights).

    Args:
        seed: seed of the per-step random task order (deterministic and resumable: drawn from (seed, step)).
    """

    def combine(self, gram: Tensor, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        n = gram.shape[0]
        idx = [t for t in range(n) if present[t]]
        coef = torch.eye(n, dtype=torch.float64)  # projected g'_i = sum_k coef[i, k] g_k
        sq = gram.diagonal()
        gen = self._generator()
        for i in idx:
            for j in [idx[k] for k in torch.randperm(len(idx), generator=gen).tolist()]:
                if j == i or sq[j] <= 0:
                    continue
                dot = float(coef[i] @ gram[:, j])  # g'_i . g_j
                if dot < 0:
                    coef[i, j] -= dot / float(sq[j])
        alpha = (coef * present.to(coef.dtype)[:, None]).sum(0)
        return alpha, torch.ones(n, dtype=torch.float64)


@register_balancer("cagrad")
class CAGradBalancer(GradientBalancer):
    """CAGrad (Liu et al. 2021, "Conflict-averse gradient descent"): the shared update maximises the worst
    task's improvement within a ball of radius ``c * |g0|`` around the mean gradient ``g0``:
    ``g = (g0 + c |g0| / |g_w| * g_w) / (1 + c^2)``, ``w`` on the simplex minimising
    ``g_w . g0 + c |g0| |g_w|`` (SLSQP over the ``[T, T]`` Gram matrix). Task-specific parts keep their own
    loss's gradient.

    Args:
        c: the radius (``calpha``; the paper's 0.5 by default).
        rescale: 0 (none), 1 (divide by 1 + c^2, the paper's) or 2 (divide by 1 + c).
    """

    def __init__(
        self,
        tasks: list[str],
        weights: Mapping[str, float] | None = None,
        c: float = 0.5,
        rescale: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, weights, seed)
        if c < 0:
            raise ConfigError(f"cagrad c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ConfigError(f"cagrad rescale must be 0, 1 or 2, got {rescale}")
        self.c = float(c)
        self.rescale = int(rescale)

    def combine(self, gram: Tensor, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        import numpy as np
        from scipy.optimize import minimize

        n = gram.shape[0]
        idx = [t for t in range(n) if present[t]]
        alpha = torch.zeros(n, dtype=torch.float64)
        if not idx:
            return alpha, torch.ones(n, dtype=torch.float64)
        a = gram[idx][:, idx].numpy()
        k = len(idx)
        mean = np.full(k, 1.0 / k)
        radius = self.c * float(np.sqrt(max(a.mean(), 0.0) + 1e-8))  # c |g0|

        def objective(x: np.ndarray) -> float:
            return float(x @ a @ mean + radius * np.sqrt(max(x @ a @ x, 0.0) + 1e-8))

        w = mean
        if k > 1 and radius > 0:
            res = minimize(
                objective,
                mean,
                bounds=[(0.0, 1.0)] * k,
                constraints=({"type": "eq", "fun": lambda x: 1.0 - x.sum()},),
            )
            if np.all(np.isfinite(res.x)):
                w = res.x
        gw_norm = float(np.sqrt(max(w @ a @ w, 0.0)))
        lam = radius / (gw_norm + 1e-8)
        coef = mean + lam * w
        scale = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        # the paper's g0 is the mean over tasks: times k keeps the scale of the summed losses of `fixed`
        alpha[idx] = torch.from_numpy(coef * k / scale)
        return alpha, torch.ones(n, dtype=torch.float64)


@register_balancer("gradnorm")
class GradNormBalancer(GradientBalancer):
    """GradNorm (Chen et al. 2018): learned weights ``w = T * softmax(theta)`` (over the tasks present) scale
    the losses everywhere; ``theta`` is trained to make each task's weighted gradient norm on the shared
    representation ``w_t |g_t|`` equal the mean norm times ``r_t ** alpha``, ``r_t`` the task's loss ratio to
    its first loss relative to the other tasks' (tasks that learn slower get larger weights).

    Args:
        alpha: the restoring force (the paper's 1.5).
    """

    def __init__(
        self,
        tasks: list[str],
        weights: Mapping[str, float] | None = None,
        alpha: float = 1.5,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, weights, seed)
        if alpha < 0:
            raise ConfigError(f"gradnorm alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.theta = nn.Parameter(torch.zeros(len(tasks)))
        # each task's first loss (NaN until the task has been in a batch)
        self.register_buffer("initial", torch.full((len(tasks),), float("nan")))

    def no_weight_decay(self) -> set[str]:
        return {"theta"}

    def _weights(self, present: Tensor) -> Tensor:
        logits = torch.where(present, self.theta.double().cpu(), float("-inf"))
        k = int(present.sum())
        if k == 0:
            return torch.zeros_like(logits)
        return k * torch.softmax(logits, 0)

    def combine(self, gram: Tensor, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        w = self._weights(present).detach()
        return w, w

    def _extra_objective(self, gram: Tensor, losses: Tensor, present: Tensor) -> Tensor:
        losses = losses.double().cpu()
        if self.training:
            first = torch.isnan(self.initial) & present.to(self.initial.device)
            self.initial.copy_(torch.where(first, losses.to(self.initial), self.initial))
        if not self.training:
            return torch.zeros((), device=self.fixed.device)
        if int(present.sum()) < 2:
            return (self.theta * 0.0).sum()  # nothing to balance; keeps theta in the graph (DDP)
        idx = present.nonzero().flatten()
        theta = self.theta.double().cpu()  # differentiable copy: its gradient reaches the parameter
        logits = torch.where(present, theta, float("-inf"))
        w = int(present.sum()) * torch.softmax(logits, 0)
        norms = gram.diagonal().clamp(min=0).sqrt()
        g = w[idx] * norms[idx]  # weighted gradient norms of the present tasks
        ratio = losses[idx] / self.initial.double().cpu()[idx].clamp(min=1e-12)
        ratio = ratio / ratio.mean().clamp(min=1e-12)
        target = (g.mean() * ratio.pow(self.alpha)).detach()
        l_grad = (g - target).abs().sum()
        (d_theta,) = torch.autograd.grad(l_grad, self.theta, retain_graph=False)
        # value 0, gradient d_theta on theta: the optimiser steps theta with everything else
        nudge = (self.theta * d_theta.detach().to(self.theta)).sum()
        return (nudge - nudge.detach()).to(self.fixed.device)


@register_balancer("rlw")
class RLWBalancer(LossBalancer):
    """Random loss weighting (Lin et al. 2022): each step's weights are ``k * softmax(z)``, ``z ~ N(0, 1)``
    over the ``k`` tasks present (the mean weight is 1, the scale of ``fixed``), drawn from (seed, step) so a
    run is deterministic, resumable, and the same on every DDP rank.

    Args:
        seed: seed of the draws.
    """

    def __init__(self, tasks: list[str], weights: Mapping[str, float] | None = None, seed: int = 0) -> None:
        super().__init__(tasks, weights)
        self.seed = int(seed)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, losses: Tensor, task_present: Tensor) -> tuple[Tensor, Tensor]:
        present = task_present.bool()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))
        z = torch.randn(len(self.tasks), generator=gen).to(losses.device)
        z = torch.where(present, z, float("-inf"))
        k = present.sum().to(losses.dtype)
        rand = torch.where(present, k * torch.softmax(z, 0), 0.0)  # all -inf (nothing present): NaN -> 0
        if self.training:
            self.steps += 1
        w = (self.fixed * rand).to(losses.dtype)
        return (w * self._masked(losses, present)).sum(), w


@register_balancer("gls")
class GLSBalancer(LossBalancer):
    """Geometric loss strategy (Chennupati et al. 2019): total = (prod_t (w_t L_t)) ** (1 / k) over the ``k``
    tasks present, i.e. the gradient weights each loss by total / (k L_t), so tasks whose loss is small are
    not drowned by large ones. Losses are floored at ``eps`` inside the logarithm (a zero loss gives weight
    and gradient 0, not NaN); the weights reported are total / (k L_t).

    Args:
        eps: the floor of the losses in the logarithm.
    """

    def __init__(
        self, tasks: list[str], weights: Mapping[str, float] | None = None, eps: float = 1e-8
    ) -> None:
        super().__init__(tasks, weights)
        if eps <= 0:
            raise ConfigError(f"gls eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, losses: Tensor, task_present: Tensor) -> tuple[Tensor, Tensor]:
        present = task_present.bool()
        scaled = self.fixed.to(losses.dtype) * self._masked(losses, present)
        logs = torch.where(present, torch.log(scaled.clamp(min=self.eps)), 0.0)
        k = present.sum().to(losses.dtype)
        total = torch.where(k > 0, torch.exp(logs.sum() / k.clamp(min=1)), 0.0)
        w = torch.where(present, total.detach() / (k.clamp(min=1) * scaled.detach().clamp(min=self.eps)), 0.0)
        return total, w * self.fixed
