"""The contract every registered loss balancer keeps (``idrecog.lit.balancing.BALANCERS``), in the model and
under Lightning: a finite loss, gradients that reach the heads of the tasks present and never an absent task's,
determinism under a seed, automatic optimisation with gradient accumulation, and no NaN from a zero loss. Plus
what the gradient balancers (PCGrad, CAGrad, GradNorm) compute on toy gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from benchmarks.common import precollated_loader
from idrecog.lit.balancing import BALANCERS, GradientBalancer, create_balancer, list_balancers
from idrecog.lit.unified import UnifiedModule
from tests.conftest import quiet_trainer
from tests.test_model_fakes import fake_batch, fake_catalogue, tiny_parts

NAMES = BALANCERS.names()


def _module(balancing: str, **kwargs: Any) -> UnifiedModule:
    torch.manual_seed(0)
    return UnifiedModule(
        catalogue=fake_catalogue().to_dict(), **tiny_parts(), balancing=balancing, warmup_steps=1, **kwargs
    )


def _toy(
    losses_at: list[float], present: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A shared representation and per-task losses read from it: L_t = scale_t * |h . d_t|^2 / 2."""
    torch.manual_seed(0)
    x = torch.randn(5, requires_grad=True)  # stands for the encoder's parameters
    shared = 2.0 * x  # the representation all tasks read
    dirs = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [-1.0, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    raw = ((shared[None] * dirs).sum(1)) ** 2 / 2
    # an absent task's loss is a constant (as the masked task losses are): its value, even NaN, has no graph
    losses = [
        torch.tensor(v) if not p else v / raw[t].detach().clamp(min=1e-12) * raw[t]
        for t, (v, p) in enumerate(zip(losses_at, present, strict=True))
    ]
    return x, shared, torch.stack(losses), torch.tensor(present)


def test_the_registry_lists_every_method() -> None:
    assert {"fixed", "uncertainty", "dwa", "pcgrad", "cagrad", "gradnorm", "rlw", "gls"} <= set(
        list_balancers()
    )


@pytest.mark.parametrize("name", NAMES)
def test_balancer_contract_in_the_model(name: str) -> None:
    """Finite loss and weights; heads of present tasks get gradients, the absent task's head none."""
    m = _module(name)
    m.train()
    present = torch.ones(4, 3, dtype=torch.bool)
    present[:, 1] = False  # task b has no label in the batch
    batch = fake_batch(m.catalogue, present=present)
    out = m.model(batch["image"], batch=batch, route="known")
    loss, _, weights, _ = m.compute_losses(out, batch)
    assert torch.isfinite(loss) and torch.isfinite(weights).all(), (loss, weights)
    assert float(weights[1]) == 0.0 and float(weights[0]) > 0 and float(weights[2]) > 0
    loss.backward()
    itp = m.model.interpreter
    for p in itp.head("b").parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    for task in ("a", "c"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in itp.head(task).parameters()), task
    enc = [p.grad for p in m.model.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in enc), "no gradient reached the encoder"
    assert all(g is None or torch.isfinite(g).all() for g in enc)
    # validation (no graph) gives a finite loss too
    m.eval()
    with torch.no_grad():
        vloss, *_ = m.compute_losses(m.model(batch["image"], batch=batch, route="known"), batch)
    assert torch.isfinite(vloss)


@pytest.mark.parametrize("name", NAMES)
def test_absent_task_loss_never_reaches_the_total(name: str) -> None:
    """Whatever an absent task's loss (even NaN), the total, the weights and the gradients are the same."""
    results = []
    for absent_loss in (1.0, 100.0, float("nan")):
        bal = create_balancer(name, ["a", "b", "c"], {"a": 2.0})
        bal.train()
        x, shared, losses, present = _toy([0.7, absent_loss, 0.3], [True, False, True])
        kw = {"shared": shared} if bal.uses_gradients else {}
        total, w = bal(losses, present, **kw)
        (gx,) = torch.autograd.grad(total, x)
        results.append((total.detach(), w.detach(), gx))
    for total, w, gx in results:
        assert torch.isfinite(total) and torch.isfinite(w).all() and torch.isfinite(gx).all()
        assert float(w[1]) == 0.0
        assert torch.allclose(total, results[0][0]) and torch.allclose(w, results[0][1])
        assert torch.allclose(gx, results[0][2])


@pytest.mark.parametrize("name", NAMES)
def test_a_zero_loss_gives_no_nan(name: str) -> None:
    bal = create_balancer(name, ["a", "b", "c"])
    bal.train()
    for _ in range(2):  # gradnorm records the first loss on the first step
        x, shared, losses, present = _toy([0.5, 0.0, 0.2], [True, True, True])
        losses = torch.where(torch.tensor([False, True, False]), losses * 0.0, losses)
        kw = {"shared": shared} if bal.uses_gradients else {}
        total, w = bal(losses, present, **kw)
        params = [x, *bal.parameters()]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        assert torch.isfinite(total) and torch.isfinite(w).all(), (total, w)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
    # nothing present at all: zero, not NaN
    x, shared, losses, _ = _toy([0.5, 0.1, 0.2], [True, True, True])
    total, w = bal(losses, torch.zeros(3, dtype=torch.bool), **kw)
    assert float(total) == 0.0 and torch.count_nonzero(w) == 0


def _fit(tmp_path: Path, name: str, seed: int, **trainer_kwargs: Any) -> dict[str, torch.Tensor]:
    L.seed_everything(seed, verbose=False)
    m = _module(name)
    cat = m.catalogue
    present = torch.ones(4, 3, dtype=torch.bool)
    present[:2, 1] = False
    batches = [fake_batch(cat, present=present if s % 2 else None, seed=s) for s in range(4)]
    trainer = quiet_trainer(
        tmp_path,
        limit_val_batches=0,
        deterministic=True,
        **trainer_kwargs,
    )
    trainer.fit(m, precollated_loader(batches))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_seed_with_automatic_optimisation_and_accumulation(
    tmp_path: Path, name: str
) -> None:
    """Lightning's automatic optimisation, two micro-batches per step: the same seed gives the same weights
    (the per-step random draws of PCGrad and RLW included), and training moved the encoder."""
    a = _fit(tmp_path, name, 0, max_steps=2, accumulate_grad_batches=2)
    b = _fit(tmp_path, name, 0, max_steps=2, accumulate_grad_batches=2)
    assert a.keys() == b.keys()
    same = lambda x, y: torch.equal(x.nan_to_num(-123.0), y.nan_to_num(-123.0))  # noqa: E731 (dwa: NaN history)
    diff = [k for k in a if not same(a[k], b[k])]
    assert not diff, f"not deterministic: {diff[:5]}"
    assert all(
        torch.isfinite(v).all() for k, v in a.items() if v.is_floating_point() and k.startswith("model.")
    )
    torch.manual_seed(0)
    init = _module(name).state_dict()
    moved = [k for k, v in init.items() if v.is_floating_point() and not torch.equal(v, a[k])]
    assert any(k.startswith("model.encoder.") for k in moved)
    assert {"a", "c"} <= {k.split(".")[4] for k in moved if k.startswith("model.interpreter.units.")}


# ---------------------------------------------------------------------------------------- gradient balancers
def _grads_balancer(name: str, **kw: Any) -> GradientBalancer:
    bal = create_balancer(name, ["a", "b"], **kw)
    assert isinstance(bal, GradientBalancer)
    return bal.train()


def test_pcgrad_projects_conflicting_gradients() -> None:
    """g1 = (1, 0), g2 = (-1, 1): each is projected off the other; the sum is the PCGrad update."""
    gram = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    bal = _grads_balancer("pcgrad")
    alpha, beta = bal.combine(gram, torch.ones(2, dtype=torch.float64), torch.tensor([True, True]))
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g1' = g1 - (g1.g2 / |g2|^2) g2 = (0.5, 0.5); g2' = g2 - (g2.g1 / |g1|^2) g1 = (0, 1)
    assert torch.allclose(alpha @ g, torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.equal(beta, torch.ones(2, dtype=torch.float64))
    # no conflict: plain sum
    alpha, _ = bal.combine(torch.eye(2, dtype=torch.float64), torch.ones(2), torch.tensor([True, True]))
    assert torch.allclose(alpha, torch.ones(2, dtype=torch.float64))


def test_cagrad_moves_toward_the_worse_task_and_equals_the_mean_at_c_zero() -> None:
    gram = torch.tensor([[1.0, -0.5], [-0.5, 4.0]], dtype=torch.float64)
    present = torch.tensor([True, True])
    a0, _ = _grads_balancer("cagrad", c=0.0).combine(gram, torch.ones(2), present)
    assert torch.allclose(a0, torch.ones(2, dtype=torch.float64))  # the summed gradient, as `fixed`
    a, _ = _grads_balancer("cagrad", c=0.5).combine(gram, torch.ones(2), present)
    # the update's inner product with the least-served task's gradient improves on the mean's
    g = torch.linalg.cholesky(gram)  # rows with that Gram matrix
    upd0, upd = a0 @ g, a @ g
    worst = lambda u: min(float(u @ g[0]), float(u @ g[1]))  # noqa: E731
    assert worst(upd / upd.norm()) > worst(upd0 / upd0.norm())


def test_the_shared_representation_receives_the_combined_gradient() -> None:
    """On the shared representation the gradient is sum_t alpha_t g_t; the loss value stays sum_t beta_t L_t."""
    for name in ("pcgrad", "cagrad", "gradnorm"):
        bal = create_balancer(name, ["a", "b", "c"])
        bal.train()
        x, shared, losses, present = _toy([0.7, 0.4, 0.3], [True, True, True])
        per_task = torch.stack([torch.autograd.grad(losses[t], x, retain_graph=True)[0] for t in range(3)])
        total, w = bal(losses, present, shared=shared)
        (gx,) = torch.autograd.grad(total, x, retain_graph=True)
        assert torch.allclose(gx, (w[:, None] * per_task).sum(0), atol=1e-5), name


def test_gradnorm_raises_the_weight_of_the_task_that_learns_slower() -> None:
    bal = _grads_balancer("gradnorm", alpha=1.5)
    opt = torch.optim.SGD(bal.parameters(), lr=0.5)
    present = torch.tensor([True, True])
    gram = torch.eye(2, dtype=torch.float64)
    losses = torch.tensor([1.0, 1.0], dtype=torch.float64)
    bal._extra_objective(gram, losses, present)  # first losses recorded
    for _ in range(20):  # task a's loss fell to a tenth, b's did not move
        opt.zero_grad()
        bal._extra_objective(gram, torch.tensor([0.1, 1.0], dtype=torch.float64), present).backward()
        opt.step()
    w = bal._weights(present)
    assert float(w[1]) > float(w[0]) and float(w.sum()) == pytest.approx(2.0)


def test_rlw_draws_depend_on_seed_and_step_only() -> None:
    def draws(seed: int) -> list[torch.Tensor]:
        bal = create_balancer("rlw", ["a", "b", "c"], seed=seed).train()
        return [bal(torch.ones(3), torch.ones(3, dtype=torch.bool))[1] for _ in range(3)]

    a, b, c = draws(0), draws(0), draws(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], c[0])
    assert all(float(w.sum()) == pytest.approx(3.0) for w in a)  # mean weight 1, the scale of `fixed`


def test_gls_is_the_geometric_mean() -> None:
    bal = create_balancer("gls", ["a", "b", "c"])
    total, w = bal(torch.tensor([4.0, 1.0, 123.0]), torch.tensor([True, True, False]))
    assert float(total) == pytest.approx(2.0) and float(w[2]) == 0.0
    assert torch.allclose(w[:2], torch.tensor([2.0 / (2 * 4.0), 2.0 / (2 * 1.0)]))
