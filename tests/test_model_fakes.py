"""Small fake task types, a fake catalogue and batch, and tiny model parts for the model tests, so that they
do not depend on the built-in heads. ``tests/test_model_*.py`` and ``tests/test_unified_module.py`` import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from idrecog.models.decoder import TaskDecoder
from idrecog.models.encoder import ViTEncoder
from idrecog.models.interpreter import TaskGuidedInterpreter
from idrecog.models.queries import LearnedQueries
from idrecog.tasks.base import HeadContext, TaskType
from idrecog.tasks.catalogue import TaskCatalogue, TaskSpec
from idrecog.tasks.registry import register_task_type

IMG = (64, 96)
DIM = 64


class _LabelHead(nn.Module):
    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, n)

    def forward(self, feats: Tensor, ctx: HeadContext) -> dict[str, Tensor]:
        return {"logits": self.fc(feats.mean(1))}


class _ValueHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, feats: Tensor, ctx: HeadContext) -> dict[str, Tensor]:
        return {"value": self.fc(feats[:, 0]).squeeze(-1).sigmoid()}


@register_task_type
class FakeLabel(TaskType):
    """Classification-like; ``num_queries`` option (default 2) to exercise multi-token tasks."""

    type_name = "fake_label"
    label_format = "a class name"
    target_format = "LongTensor [B], -1 where absent"
    primary_metric = "accuracy"

    @property
    def num_queries(self) -> int:
        return int(self.options.get("num_queries", 2))

    def check_label(self, value: Any) -> None:
        if value not in (self.spec.classes or ()):
            raise ValueError(f"{value!r} is not a class")

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> int:
        return self.spec.class_index(value)

    def collate(self, targets: list[Any | None], image_size: tuple[int, int]) -> Tensor:
        return torch.tensor([-1 if t is None else t for t in targets])

    def build_head(self, dim: int) -> nn.Module:
        return _LabelHead(dim, self.spec.num_classes)

    def loss(self, outputs: dict[str, Tensor], targets: Tensor, present: Tensor) -> Tensor:
        idx = present.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            return self.zero_loss(outputs)
        return F.cross_entropy(outputs["logits"][idx], targets[idx])

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"accuracy": MulticlassAccuracy(self.spec.num_classes, average="micro")})

    def update_metrics(
        self, metrics: MetricCollection, outputs: dict[str, Tensor], targets: Any, present: Tensor
    ) -> None:
        idx = present.nonzero(as_tuple=True)[0]
        if idx.numel():
            metrics.update(outputs["logits"][idx].detach(), targets[idx])

    def postprocess(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        return [{"class": (self.spec.classes or ())[int(i)]} for i in outputs["logits"].argmax(-1)]

    @classmethod
    def example_spec(cls) -> TaskSpec:
        return TaskSpec(
            "example_fake_label", cls.type_name, classes=("x", "y", "z"), query_text="which class"
        )

    @classmethod
    def example_label(cls, spec: TaskSpec, root: Path, image_size: tuple[int, int], seed: int = 0) -> str:
        return (spec.classes or ())[seed % spec.num_classes]


@register_task_type
class FakeValue(TaskType):
    """Regression-like: value in [0, 1] normalised units; MAE reported in the catalogue range's units."""

    type_name = "fake_value"
    label_format = "a number in [0, 1]"
    target_format = "FloatTensor [B], NaN where absent"
    primary_metric = "mae"
    higher_is_better = False

    def check_label(self, value: Any) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")

    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> float:
        return float(value)

    def collate(self, targets: list[Any | None], image_size: tuple[int, int]) -> Tensor:
        return torch.tensor([float("nan") if t is None else t for t in targets])

    def build_head(self, dim: int) -> nn.Module:
        return _ValueHead(dim)

    def loss(self, outputs: dict[str, Tensor], targets: Tensor, present: Tensor) -> Tensor:
        idx = present.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            return self.zero_loss(outputs)
        return F.mse_loss(outputs["value"][idx], targets[idx])

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"mae": MeanAbsoluteError()})

    def update_metrics(
        self, metrics: MetricCollection, outputs: dict[str, Tensor], targets: Any, present: Tensor
    ) -> None:
        idx = present.nonzero(as_tuple=True)[0]
        if idx.numel():
            lo, hi = self.spec.range or (0.0, 1.0)
            metrics.update(outputs["value"][idx].detach() * (hi - lo) + lo, targets[idx] * (hi - lo) + lo)

    def postprocess(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        return [{"value": float(v)} for v in outputs["value"]]

    @classmethod
    def example_spec(cls) -> TaskSpec:
        return TaskSpec("example_fake_value", cls.type_name, range=(0.0, 10.0), query_text="how much")

    @classmethod
    def example_label(cls, spec: TaskSpec, root: Path, image_size: tuple[int, int], seed: int = 0) -> float:
        return (seed * 0.37 + 0.1) % 1.0  # normalised units


def fake_catalogue() -> TaskCatalogue:
    """Three tasks of two fake types: a (3 classes), b (2 classes), c (value in [0, 10])."""
    return TaskCatalogue(
        tasks=[
            TaskSpec("a", "fake_label", classes=("x", "y", "z")),
            TaskSpec("b", "fake_label", classes=("p", "q")),
            TaskSpec("c", "fake_value", range=(0.0, 10.0)),
        ],
        source="fake",
    )


def tiny_parts(cross_task_attention: bool = False, dim: int = DIM) -> dict[str, Any]:
    """Encoder, queries, decoder and interpreter small enough for CPU tests (ViT depth 1, width 64)."""
    return {
        "encoder": ViTEncoder("vit_tiny_patch16_224", img_size=IMG, depth=2, embed_dim=48, num_heads=2),
        "queries": LearnedQueries(),
        "decoder": TaskDecoder(dim=dim, depth=2, num_heads=4, cross_task_attention=cross_task_attention),
        "interpreter": TaskGuidedInterpreter(guidance_hidden=32),
    }


def fake_batch(
    catalogue: TaskCatalogue, b: int = 4, present: Tensor | None = None, seed: int = 0
) -> dict[str, Any]:
    """A batch in the DataModule contract for the fake catalogue; ``present`` [B, T] defaults to all True."""
    g = torch.Generator().manual_seed(seed)
    t = len(catalogue)
    present = torch.ones(b, t, dtype=torch.bool) if present is None else present
    targets: dict[str, Tensor] = {}
    for i, spec in enumerate(catalogue):
        if spec.type == "fake_label":
            y = torch.randint(0, spec.num_classes, (b,), generator=g)
            targets[spec.name] = torch.where(present[:, i], y, -1)
        else:
            y = torch.rand(b, generator=g)
            targets[spec.name] = torch.where(present[:, i], y, float("nan"))
    return {
        "image": torch.randn(b, 3, *IMG, generator=g),
        "applies": torch.ones(b, t, dtype=torch.bool),
        "present": present,
        "targets": targets,
        "ids": [f"s{i}" for i in range(b)],
        "doc_type": [None] * b,
    }


def test_fake_catalogue_round_trips_through_the_validating_parser() -> None:
    cat = fake_catalogue()
    again = TaskCatalogue.from_dict(cat.to_dict())
    assert again.diff(cat) == []
    assert again.types() == ["fake_label", "fake_value"]
