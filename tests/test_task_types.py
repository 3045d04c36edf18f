"""Contract tests run on every registered task type (built-ins, the example plugin, and any future type).

A type opts in by providing ``example_spec()`` / ``example_label()``; the checks below need no per-type code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import tests.plugins.ordinal_task  # noqa: F401  (registers "ordinal", so it gets the same checks)
from idrecog.tasks import (
    CLASS,
    NUMBER,
    HeadContext,
    TaskType,
    create_task_type,
    get_task_type_class,
    list_task_types,
)
from idrecog.tasks.catalogue import TaskCatalogue

torch.set_num_threads(1)

H, W = 32, 48  # small image; segmentation pixel features are H/4 x W/4
DIM = 16
# samples 0, 2, 3 labelled; 1 and 4 absent (placeholders in the collated targets)
LABELLED = (0, 2, 3)
B = 5


def _take(x: Any, idx: list[int]) -> Any:
    if isinstance(x, Tensor):
        return x[idx]
    if isinstance(x, dict):
        return {k: _take(v, idx) for k, v in x.items()}
    if isinstance(x, list):
        return [x[i] for i in idx]
    raise TypeError(type(x))


def _batch_len(x: Any) -> int:
    return x.shape[0] if isinstance(x, Tensor) else len(x)


def _json_default(o: Any) -> Any:
    # only numpy arrays (segmentation masks, written as PNG by callers) may be non-JSON
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


class Setup:
    def __init__(self, type_name: str, root: Path, seed: int = 0) -> None:
        cls = get_task_type_class(type_name)
        try:
            spec = cls.example_spec()
        except NotImplementedError:
            pytest.skip(f"task type {type_name!r} provides no example_spec()")
        cls.validate_spec(spec)
        self.task: TaskType = create_task_type(spec)
        self.labels = [cls.example_label(spec, root, (H, W), seed=i) for i in range(len(LABELLED))]
        for value in self.labels:
            self.task.check_label(value)
        loaded = iter(self.task.load_target(v, root, (H, W)) for v in self.labels)
        self.per_sample = [next(loaded) if i in LABELLED else None for i in range(B)]
        self.targets = self.task.collate(self.per_sample, (H, W))
        self.present = torch.tensor([i in LABELLED for i in range(B)])
        torch.manual_seed(seed)
        self.head = self.task.build_head(DIM)
        self.feats = torch.randn(B, self.task.num_queries, DIM)
        pix = torch.randn(B, DIM, H // 4, W // 4) if self.task.needs_pixel_features else None
        self.ctx = HeadContext(pixel_feats=pix, image_size=(H, W))

    def outputs(self) -> dict[str, Tensor]:
        return self.head(self.feats, self.ctx)


@pytest.fixture(params=list_task_types())
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    return Setup(request.param, tmp_path)


def test_class_attributes(setup: Setup) -> None:
    cls = type(setup.task)
    assert cls.label_format and cls.target_format, "documented label and target formats"
    assert isinstance(cls.primary_metric, str) and cls.primary_metric
    assert setup.task.num_queries >= 1


def test_catalogue_round_trip(setup: Setup) -> None:
    spec = setup.task.spec
    cat = TaskCatalogue.from_dict({"tasks": [spec.to_dict()]})
    assert cat[spec.name] == spec


def test_check_label_rejects_garbage(setup: Setup) -> None:
    with pytest.raises(ValueError):
        setup.task.check_label(object())


def test_target_format(setup: Setup) -> None:
    assert _batch_len(setup.targets) == B
    # a batch of one labelled sample holds the same target as row 0 of the mixed batch
    alone = setup.task.collate([setup.per_sample[0]], (H, W))
    row0 = _take(setup.targets, [0])
    if isinstance(alone, Tensor):
        torch.testing.assert_close(alone, row0)
    else:
        assert repr(alone) == repr(row0)


def test_output_shapes(setup: Setup) -> None:
    out = setup.outputs()
    assert out, "the head returns at least one output"
    declared = setup.task.output_shapes(B, (H, W))
    for key, value in out.items():
        assert isinstance(value, Tensor), key
        assert value.shape[0] == B, f"{key} leads with the batch dimension"
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
    if declared is not None:
        assert {k: tuple(v.shape) for k, v in out.items()} == declared


def test_loss_finite_and_grads_reach_every_parameter(setup: Setup) -> None:
    loss = setup.task.loss(setup.outputs(), setup.targets, setup.present)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in setup.head.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets a zero gradient"


def test_loss_is_exactly_zero_without_present_samples(setup: Setup) -> None:
    out = setup.outputs()
    loss = setup.task.loss(out, setup.targets, torch.zeros(B, dtype=torch.bool))
    assert loss.ndim == 0 and loss.item() == 0.0 and not math.isnan(loss.item())
    assert loss.requires_grad, "zero loss stays attached to the graph"
    loss.backward()
    for name, p in setup.head.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_absent_samples_do_not_leak(setup: Setup) -> None:
    # the loss and the metrics on the mixed batch equal those on the labelled rows alone
    out = {k: v.detach() for k, v in setup.outputs().items()}
    full = setup.task.loss(out, setup.targets, setup.present)
    sub_out, sub_t = _take(out, list(LABELLED)), _take(setup.targets, list(LABELLED))
    sub = setup.task.loss(sub_out, sub_t, torch.ones(len(LABELLED), dtype=torch.bool))
    torch.testing.assert_close(full, sub)

    m_full, m_sub = setup.task.build_metrics(), setup.task.build_metrics()
    setup.task.update_metrics(m_full, out, setup.targets, setup.present)
    setup.task.update_metrics(m_sub, sub_out, sub_t, torch.ones(len(LABELLED), dtype=torch.bool))
    a, b = setup.task.compute_metrics(m_full), setup.task.compute_metrics(m_sub)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_metrics(setup: Setup) -> None:
    metrics = setup.task.build_metrics()
    assert setup.task.compute_metrics(metrics) == {}, "never-updated metrics report nothing"
    out = {k: v.detach() for k, v in setup.outputs().items()}
    setup.task.update_metrics(metrics, out, setup.targets, torch.zeros(B, dtype=torch.bool))
    assert setup.task.compute_metrics(metrics) == {}, "a batch with no present sample updates nothing"
    setup.task.update_metrics(metrics, out, setup.targets, setup.present)
    values = setup.task.compute_metrics(metrics)
    assert setup.task.primary_metric in values
    for key, v in values.items():
        assert isinstance(v, Tensor) and v.ndim == 0 and torch.isfinite(v), key


def test_postprocess_is_json_serialisable(setup: Setup) -> None:
    with torch.no_grad():
        results = setup.task.postprocess(setup.outputs())
    assert len(results) == B
    for r in results:
        assert isinstance(r, dict) and r
        json.loads(json.dumps(r, default=_json_default))


def test_rule_fields_read_the_postprocessed_outputs(setup: Setup) -> None:
    """Every field a decision rule may test can be read from the type's own outputs, with the declared kind."""
    spec = setup.task.spec
    fields = type(setup.task).rule_fields(spec)
    assert set(fields.values()) <= {NUMBER, CLASS}
    with torch.no_grad():
        results = setup.task.postprocess(setup.outputs())
    for field, kind in fields.items():
        for r in results:
            try:
                v = type(setup.task).rule_value(spec, r, field)
            except KeyError:  # an output may lack a field (a class absent from it): rules then skip
                continue
            if kind == NUMBER:
                assert isinstance(v, int | float) and not isinstance(v, bool), (field, v)
            else:
                assert v in (spec.classes or ()), (field, v)


def test_label_statistics(setup: Setup, tmp_path: Path) -> None:
    stats = setup.task.new_label_stats()
    loaded = [setup.task.load_target(v, tmp_path, (H, W)) for v in setup.labels]
    for value, target in zip(setup.labels, loaded, strict=True):
        stats = setup.task.add_label_stats(stats, value, target)
    text = setup.task.format_label_stats(stats, len(setup.labels))
    assert isinstance(text, str) and text and "\n" not in text


def test_drawing_targets_and_outputs(setup: Setup) -> None:
    """Each type draws its labels and outputs (a mask, boxes or a caption line) for data show, overlays, W&B."""
    from PIL import Image

    from idrecog.tasks import Canvas

    image = Image.new("RGB", (W, H), (128, 128, 128))
    truth = Canvas(image, layer="target")
    setup.task.draw_target(truth, setup.per_sample[LABELLED[0]])
    pred = Canvas(image, layer="prediction")
    with torch.no_grad():
        setup.task.draw_output(pred, setup.task.postprocess(setup.outputs())[0])
    for canvas in (truth, pred):
        assert canvas.masks or canvas.boxes or canvas.lines
        picture = canvas.render(width=2 * W)
        assert picture.width == 2 * W and picture.height >= 2 * H


def test_example_target_is_a_collated_batch_target(setup: Setup) -> None:
    present = [i in LABELLED for i in range(B)]
    target = setup.task.example_target(present, (H, W), seed=0)
    assert _batch_len(target) == B
    loss = setup.task.loss({k: v.detach() for k, v in setup.outputs().items()}, target, torch.tensor(present))
    assert torch.isfinite(loss)
    none = setup.task.example_target([False] * B, (H, W))
    assert _batch_len(none) == B


def test_zero_loss_follows_the_outputs_device() -> None:
    out = {"logits": torch.randn(2, 3, device="meta", requires_grad=True)}
    z = TaskType.zero_loss(out)
    assert z.device.type == "meta" and z.requires_grad
    z_cpu = TaskType.zero_loss({"x": torch.full((2,), float("nan"), requires_grad=True)})
    assert z_cpu.item() == 0.0, "NaN outputs still give an exact zero"


def test_classification_class_weights_weight_the_cross_entropy() -> None:
    from idrecog.errors import ConfigError

    cls = get_task_type_class("classification")
    spec = cls.example_spec()
    c = spec.num_classes
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, c, generator=g)
    targets = torch.tensor([0, 1, 1, 0, c - 1, 0])
    present = torch.ones(6, dtype=torch.bool)
    weights = [1.0] + [3.0] * (c - 1)
    tt = create_task_type(spec, class_weights=weights)
    expected = torch.nn.functional.cross_entropy(logits, targets, weight=torch.tensor(weights))
    torch.testing.assert_close(tt.loss({"logits": logits}, targets, present), expected)
    plain = create_task_type(spec).loss({"logits": logits}, targets, present)
    assert not torch.allclose(plain, expected)  # the weights change the loss
    for bad in ([1.0] * (c + 1), [1.0] * (c - 1) + [0.0], "balanced", [True] * c):
        with pytest.raises(ConfigError, match=r"options\.class_weights"):
            create_task_type(spec, class_weights=bad)
