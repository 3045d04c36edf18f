"""UnifiedModule: loss masking for partial labels, balancing, optimiser groups and schedule, a few optimisation
steps, metrics and the table, prediction routing, and checkpoint round trips (Python- and CLI-built)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.cli import instantiate_module

from benchmarks.common import precollated_loader
from idrecog.errors import ConfigError
from idrecog.lit.balancing import create_balancer, list_balancers
from idrecog.lit.optim import WarmupCosine, resolve_warmup
from idrecog.lit.unified import UnifiedModule, format_metrics_table, load_unified, score_of
from tests.conftest import quiet_trainer
from tests.test_model_fakes import IMG, fake_batch, fake_catalogue, tiny_parts


def _module(**kwargs: Any) -> UnifiedModule:
    torch.manual_seed(0)
    return UnifiedModule(catalogue=fake_catalogue().to_dict(), **tiny_parts(), **kwargs)


def _loader(batches: list[dict[str, Any]]) -> torch.utils.data.DataLoader:
    return precollated_loader(batches)


def test_absent_task_gives_zero_loss_and_no_gradient_to_its_head() -> None:
    m = _module()
    present = torch.ones(4, 3, dtype=torch.bool)
    present[:, 1] = False  # task b has no label in the whole batch
    batch = fake_batch(m.catalogue, present=present)
    loss = m._shared_step(batch, "train")
    assert torch.isfinite(loss)
    meters = m.loss_meters["train_"]
    assert float(meters["b"].total) == 0.0 and float(meters["b"].count) == 0.0
    loss.backward()
    itp = m.model.interpreter
    for p in itp.head("b").parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    for task in ("a", "c"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in itp.head(task).parameters())
    # the absent task's query tokens only move through the gate loss, never through its head's loss
    m.zero_grad()
    m2 = _module(gate_loss_weight=0.0)
    m2._shared_step(batch, "train").backward()
    g = m2.model.queries.embeds["b"].grad
    assert g is None or torch.count_nonzero(g) == 0


@pytest.mark.parametrize("name", ["fixed", "uncertainty", "dwa"])
def test_balancers_give_finite_weights_and_ignore_absent_tasks(name: str) -> None:
    assert name in list_balancers()
    bal = create_balancer(name, ["a", "b", "c"], {"a": 2.0})
    losses = torch.tensor([3.0, float("nan"), 0.5], requires_grad=True)
    present = torch.tensor([True, False, True])
    for _ in range(3):  # dwa needs two epochs of history
        total, w = bal(losses, present)
        bal.epoch_end()
    assert torch.isfinite(total) and torch.isfinite(w).all()
    assert float(w[1]) == 0.0 and float(w[0]) > 0 and float(w[2]) > 0
    total.backward()
    assert torch.isfinite(losses.grad).all() and float(losses.grad[1]) == 0.0
    if name == "uncertainty":
        assert float(bal.log_vars.grad[1]) == 0.0 and float(bal.log_vars.grad[0]) != 0.0
    if name == "fixed":
        assert float(total.detach()) == pytest.approx(2.0 * 3.0 + 0.5)


def test_dwa_upweights_the_task_whose_loss_falls_slowest() -> None:
    bal = create_balancer("dwa", ["fast", "slow"], temperature=2.0)
    present = torch.tensor([True, True])
    for losses in ([1.0, 1.0], [0.2, 0.9]):
        bal(torch.tensor(losses), present)
        bal.epoch_end()
    _, w = bal(torch.tensor([0.1, 0.8]), present)
    assert float(w[1]) > float(w[0]) and float(w.sum()) == pytest.approx(2.0)


def test_balancing_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown balancer"):
        create_balancer("magic", ["a"])
    with pytest.raises(ConfigError, match="unknown tasks"):
        create_balancer("fixed", ["a"], {"zz": 1.0})


def test_layer_decay_groups_and_no_decay_exemptions() -> None:
    m = _module(lr=1e-3, encoder_lr_scale=0.5, layer_decay=0.5, weight_decay=0.05)
    opt = m.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # before warm-up scaling
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    vit = m.model.encoder.vit
    b0, b1 = vit.blocks[0].attn.qkv.weight, vit.blocks[1].attn.qkv.weight
    assert lr_of[id(b1)] > lr_of[id(b0)]  # deeper block: larger lr
    assert lr_of[id(b0)] == pytest.approx(lr_of[id(b1)] * 0.5)  # one layer_decay step per block
    assert lr_of[id(b1)] <= 1e-3 * 0.5  # encoder_lr_scale
    assert lr_of[id(vit.pos_embed)] < lr_of[id(b0)]
    assert wd_of[id(vit.pos_embed)] == 0.0 and wd_of[id(vit.blocks[0].attn.qkv.bias)] == 0.0
    assert wd_of[id(b0)] == 0.05
    assert wd_of[id(m.model.queries.embeds["a"])] == 0.0
    head_w = m.model.interpreter.head("a").fc.weight
    assert lr_of[id(head_w)] == 1e-3 and wd_of[id(head_w)] == 0.05
    n_params = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params  # every parameter exactly once


def test_warmup_then_cosine_to_the_floor() -> None:
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(110) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    assert resolve_warmup(0.1, 200) == 20 and resolve_warmup(30, 200) == 30
    assert WarmupCosine(5, math.inf, 0.01)(50) == 1.0


@pytest.mark.parametrize("balancing", ["fixed", "uncertainty"])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(balancing: str) -> None:
    torch.manual_seed(0)
    m = _module(lr=3e-3, warmup_steps=1, balancing=balancing)
    opt = m.configure_optimizers()["optimizer"]
    batch = fake_batch(m.catalogue, b=4)
    m.train()
    losses = []
    for _ in range(12):
        loss = m._shared_step(batch, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_score_makes_errors_higher_is_better() -> None:
    m = _module()
    assert score_of(m.task_types["a"], 0.8) == 0.8
    assert score_of(m.task_types["c"], 2.5) == pytest.approx(1 - 2.5 / 10.0)  # range [0, 10]
    assert score_of(m.task_types["c"], 25.0) == 0.0


def test_validate_logs_metrics_score_and_the_table(tmp_path: Path) -> None:
    m = _module()
    present = torch.ones(4, 3, dtype=torch.bool)
    present[:, 1] = False  # task b never labelled: no metrics, not in the score
    batches = [fake_batch(m.catalogue, present=present, seed=s) for s in range(2)]
    trainer = quiet_trainer(tmp_path)
    trainer.validate(m, _loader(batches), verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"val/a/accuracy", "val/c/mae", "val/a/loss", "val/score", "val/gate_accuracy", "val/loss"} <= set(
        metrics
    )
    # b's label is never known: no task metric, no loss; whether it applies is known (its gate is measured)
    assert {k for k in metrics if k.startswith("val/b/")} == {"val/b/gate_f1"}
    assert 0.0 <= metrics["val/gate_exact_match"] <= 1.0
    expected = (metrics["val/a/accuracy"] + max(0.0, 1 - metrics["val/c/mae"] / 10.0)) / 2
    assert metrics["val/score"] == pytest.approx(expected, abs=1e-5)
    table = format_metrics_table(metrics, m.catalogue)
    assert "[val]" in table and "score=" in table
    row_a = next(line for line in table.splitlines() if line.startswith("a "))
    assert "fake_label" in row_a and f"accuracy={metrics['val/a/accuracy']:.4f}" in row_a
    assert format_metrics_table({}, None) == "(no metrics)\n"


def test_predict_restricts_to_applying_tasks_and_reports_withheld() -> None:
    m = _module().eval()
    batch = fake_batch(m.catalogue, b=2)
    batch["applies"][0, 2] = False  # task c does not apply to sample 0
    itp = m.model.interpreter
    with torch.no_grad():
        itp.guidance[-1].bias.zero_()
        itp.guidance[-1].bias[0] = 1e4  # every task applies
        itp.guidance[-1].bias[1 + itp.type_names.index("fake_label")] = 1e4
        res = m.predict_step(batch, 0)
    assert [r["id"] for r in res] == ["s0", "s1"]
    assert set(res[0]["outputs"]) == {"a", "b"} and res[0]["withheld"] == {}
    assert set(res[1]["outputs"]) == {"a", "b"} and res[1]["withheld"] == {"c": "gate opened fake_label"}
    with torch.no_grad():
        itp.guidance[-1].bias[0] = -1e4  # no task applies: every gate closed
        res = m.predict_step(batch, 0)
    assert res[1]["outputs"] == {} and res[1]["withheld"] == {t: "gate closed" for t in "abc"}
    assert res[1]["routing"]["a"]["open"] is False and res[1]["routing"]["a"]["open_probability"] < 0.5


def _fit_and_save(m: UnifiedModule, tmp_path: Path) -> Path:
    batch = fake_batch(m.catalogue, b=2)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(m, _loader([batch, batch]))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    return path


def _same_outputs(a: UnifiedModule, b: UnifiedModule) -> None:
    images = torch.randn(2, 3, *IMG)
    a.eval(), b.eval()
    with torch.no_grad():
        oa, ob = a(images), b(images)
    for t in oa["outputs"]:
        for k in oa["outputs"][t]:
            assert torch.equal(oa["outputs"][t][k], ob["outputs"][t][k]), (t, k)


def test_checkpoint_round_trip_python_built(tmp_path: Path) -> None:
    m = _module(balancing="dwa", task_weights={"a": 2.0}, task_options={"fake_label": {"num_queries": 3}})
    path = _fit_and_save(m, tmp_path)
    ckpt = torch.load(path, weights_only=True)  # plain data: no pickled modules or classes
    assert ckpt["hyper_parameters"]["encoder"]["class_path"] == "idrecog.models.encoder.ViTEncoder"
    assert ckpt["hyper_parameters"]["encoder"]["init_args"]["init_from"] is None
    for loaded in (UnifiedModule.load_from_checkpoint(path, weights_only=True), load_unified(path)):
        assert loaded.model.query_counts["a"] == 3 and loaded.hparams.balancing == "dwa"
        _same_outputs(m, loaded)


def test_checkpoint_round_trip_cli_built(tmp_path: Path) -> None:
    # the way LightningCLI builds the model: jsonargparse instantiates class_path/init_args configs, and the
    # CLI's hparams (with _class_path/_instantiator) reach save_hyperparameters through the context
    parts = {
        "encoder": {
            "class_path": "idrecog.models.encoder.ViTEncoder",
            "init_args": {"img_size": list(IMG), "depth": 2, "embed_dim": 48, "num_heads": 2},
        },
        "queries": {"class_path": "idrecog.models.queries.LearnedQueries"},
        "decoder": {"class_path": "idrecog.models.decoder.TaskDecoder", "init_args": {"dim": 64, "depth": 1}},
        "interpreter": {"class_path": "idrecog.models.interpreter.TaskGuidedInterpreter"},
    }
    config = {
        "_class_path": "idrecog.lit.unified.UnifiedModule",
        "catalogue": fake_catalogue().to_dict(),
        **parts,
    }
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    torch.manual_seed(0)
    with _given_hyperparameters_context(
        hparams=config, instantiator="lightning.pytorch.cli.instantiate_module"
    ):
        m = instantiate_module(UnifiedModule, config)
    assert isinstance(m, UnifiedModule) and m.model.decoder.dim == 64
    path = _fit_and_save(m, tmp_path)
    _same_outputs(m, UnifiedModule.load_from_checkpoint(path, weights_only=True))
    _same_outputs(m, load_unified(path, catalogue=fake_catalogue()))


def test_load_unified_refuses_a_different_catalogue(tmp_path: Path) -> None:
    m = _module()
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    other = fake_catalogue().to_dict()
    other["tasks"][1]["classes"] = ["p", "q", "r"]
    other["tasks"].pop(0)
    with pytest.raises(ConfigError) as e:
        load_unified(path, catalogue=other)
    assert "'a'" in str(e.value) and "'b'" in str(e.value) and "'c'" not in str(e.value)


def test_default_catalogue_builtins_partial_labels_step() -> None:
    from benchmarks.common import make_random_batch
    from idrecog.tasks.catalogue import default_catalogue

    cat = default_catalogue()
    torch.manual_seed(0)
    m = UnifiedModule(catalogue=cat.to_dict(), **tiny_parts(), task_options={"detection": {"num_queries": 4}})
    batch = make_random_batch(cat, 2, IMG, present_prob=1.0)
    t = cat.index("fields")
    batch["present"][:, t] = False
    batch["targets"]["fields"] = [None, None]
    loss = m._shared_step(batch, "train")
    assert torch.isfinite(loss)
    loss.backward()
    head = m.model.interpreter.head("fields")
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in head.parameters())
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in m.model.interpreter.head("card_mask").parameters()
    )
    res = m.eval().predict_step(batch, 0)
    assert len(res) == 2 and set(res[0]["outputs"]) | set(res[0]["withheld"]) == set(cat.names)
