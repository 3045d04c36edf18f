"""The task-type interface. One subclass per task type; see ``idrecog/tasks/registry.py`` for the plugin table.

A task type owns everything type-specific, so that the data pipeline, the model and the trainer stay generic:

* data side: ``check_label`` (manifest value), ``load_target`` (value -> per-sample target, with
  ``torchvision.tv_tensors`` for anything geometric so that v2 transforms move it with the image), ``collate``;
  ``new_label_stats`` / ``add_label_stats`` / ``format_label_stats`` (what ``idrecog data check`` reports);
* model side: ``num_queries`` (query tokens the task owns in the decoder), ``build_head`` (its output unit),
  ``loss``, ``build_metrics`` / ``update_metrics`` / ``compute_metrics``, ``postprocess`` (JSON-able outputs);
* recognition: ``rule_fields`` / ``rule_value`` (what a decision rule may test on an output);
* pictures: ``draw_target`` / ``draw_output`` on a :class:`~idrecog.tasks.drawing.Canvas` (``idrecog data show``,
  prediction overlays, W&B images);
* self-description for tests and docs: ``example_spec`` / ``example_label`` (a small catalogue entry and a
  valid manifest value, so that the contract tests in ``tests/test_task_types.py`` cover every registered type
  with no per-type code), ``example_target`` (a collated random batch target) and ``output_shapes``.

Shapes: ``task_feats: [B, Q, D]`` for the task's Q query tokens; ``present: [B]`` bool, True where the task
applies to the sample and its label is known. Losses are means over present samples and are exactly zero
(still attached to the graph, never NaN) when no sample is present. The targets of absent samples are
placeholders (-1, NaN, all-255 masks, None) and must never reach a loss or a metric.
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from idrecog.tasks.catalogue import TaskSpec
from idrecog.tasks.drawing import Canvas

#: kinds of rule fields: a number, or a class name among the task's ``classes``
NUMBER, CLASS = "number", "class"


class PixelProjector(Protocol):
    """What a head context needs of the model's pixel decoder (``idrecog.models.pixel_decoder.PixelDecoder``):
    its last linear layer and the projection of narrow per-pixel features to the D-wide map."""

    proj: nn.Linear

    def project(self, hidden: Tensor) -> Tensor: ...


class HeadContext:
    """What an output unit may read besides its task features.

    pixel_feats: [B, D, H/4, W/4] from the pixel decoder, or None when no task needs it.
    image_size: (H, W) of the network input.
    pixel_hidden / pixel_decoder: the pixel decoder's narrow per-pixel features [B, H/4, W/4, C] (channels last,
        ``PixelDecoder.forward_hidden``) and the decoder itself, whose ``project`` gives ``pixel_feats`` on first
        access. Heads that only dot embeddings with the pixel features should call :meth:`dot_pixels`, which
        folds the decoder's last linear layer into the embeddings and never builds the D-wide map (on CPU that
        map cost more than the ViT-Tiny encoder's blocks at inference).
    """

    def __init__(
        self,
        pixel_feats: Tensor | None,
        image_size: tuple[int, int],
        pixel_hidden: Tensor | None = None,
        pixel_decoder: PixelProjector | None = None,
    ) -> None:
        self._pixel_feats = pixel_feats
        self.image_size = image_size
        self.pixel_hidden = pixel_hidden
        self.pixel_decoder = pixel_decoder

    @property
    def _deferred(self) -> bool:
        """The D-wide map is not built yet but can be (narrow features and their decoder are at hand)."""
        return self._pixel_feats is None and self.pixel_hidden is not None and self.pixel_decoder is not None

    @property
    def has_pixel_features(self) -> bool:
        return self._pixel_feats is not None or self._deferred

    @property
    def pixel_feats(self) -> Tensor | None:
        if self._deferred:
            self._pixel_feats = self.pixel_decoder.project(self.pixel_hidden)  # type: ignore[union-attr]
        return self._pixel_feats

    def dot_pixels(self, emb: Tensor) -> Tensor:
        """emb: [B, K, D] -> [B, K, H/4, W/4], the dot product of each embedding with every pixel feature."""
        if self._deferred:
            # emb . (W h + b) = (emb W) . h + emb . b: the product runs in the narrow C-wide space
            proj = self.pixel_decoder.proj  # type: ignore[union-attr]
            out = torch.einsum("bkc,bhwc->bkhw", emb @ proj.weight, self.pixel_hidden)
            return out if proj.bias is None else out + (emb @ proj.bias)[..., None, None]
        feats = self.pixel_feats
        if feats is None:
            raise ValueError(
                "HeadContext has no pixel features (no task of the model needs the pixel decoder)"
            )
        return torch.einsum("bkd,bdhw->bkhw", emb, feats)


class TaskType(ABC):
    """Base class of a task type (classification, regression, segmentation, detection, or your own)."""

    type_name: ClassVar[str]
    #: one line for docs and errors: the JSON label value the manifest holds
    label_format: ClassVar[str] = ""
    #: the collated target handed to ``loss`` and ``update_metrics``
    target_format: ClassVar[str] = ""
    #: one line for docs: what the output unit returns
    output_format: ClassVar[str] = ""
    #: key of the metric that enters ``val/score``, and whether higher is better
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    #: whether the head reads ``HeadContext.pixel_feats`` (so the model builds the pixel decoder)
    needs_pixel_features: ClassVar[bool] = False
    #: the postprocessed output names one of ``spec.classes`` under ``"class"`` (so such a task whose classes are
    #: the catalogue's doc types can resolve an image's tasks: ``TaskCatalogue.doc_type_task``)
    predicts_class: ClassVar[bool] = False
    #: ``idrecog data check`` loads the targets of every k-th label only (targets that are costly to load)
    sampled_label_stats: ClassVar[bool] = False
    #: the ``TaskSpec`` fields of ``example_spec`` other than its name and type (None: the type provides none)
    example_fields: ClassVar[Mapping[str, Any] | None] = None

    def __init__(self, spec: TaskSpec, **options: Any) -> None:
        self.spec = spec
        self.options = options

    @property
    def name(self) -> str:
        return self.spec.name

    # ---------------------------------------------------------------- catalogue and data side
    @classmethod
    def validate_spec(cls, spec: TaskSpec) -> None:
        """Raise ``ValueError`` when the catalogue entry lacks what the type needs (classes, range...)."""
        return None

    @abstractmethod
    def check_label(self, value: Any) -> None:
        """Raise ``ValueError`` with a short message when a (non-null) manifest value is malformed."""

    @abstractmethod
    def load_target(self, value: Any, root: Path, image_size: tuple[int, int]) -> Any:
        """Turn a non-null manifest value into a per-sample target. ``image_size`` is (H, W) of the image."""

    def label_files(self, value: Any) -> list[str]:
        """The files (paths relative to the dataset folder) that ``load_target`` reads for a non-null manifest
        value, so that ``idrecog data pack`` stores them with the sample. Default: none (the value is the label)."""
        return []

    @abstractmethod
    def collate(self, targets: list[Any | None], image_size: tuple[int, int]) -> Any:
        """Batch per-sample targets; ``None`` marks a sample whose label is absent. ``image_size``: (H, W) of the
        batch's images (dense targets need it when no sample of the batch is labelled)."""

    def new_label_stats(self) -> Any:
        """An empty accumulator of label statistics for ``idrecog data check``. Default: class counts."""
        return Counter()

    def add_label_stats(self, stats: Any, value: Any, target: Any) -> Any:
        """Add one label (manifest ``value`` and its loaded ``target``) to ``stats``; returns ``stats``. Default:
        counts the value when the task has classes and the value names one."""
        if self.spec.classes and isinstance(value, str):
            stats[value] += 1
        return stats

    def format_label_stats(self, stats: Any, labelled: int) -> str:
        """One short cell of the ``data check`` table. Default: each class's share (``-`` without classes)."""
        if not self.spec.classes or not isinstance(stats, Counter):
            return "-"
        total = sum(stats.values()) or 1
        return " ".join(f"{c}={stats.get(c, 0) / total:.0%}" for c in self.spec.classes)

    # ---------------------------------------------------------------- model side
    @property
    def num_queries(self) -> int:
        """How many query tokens the task owns in the task decoder."""
        return 1

    @abstractmethod
    def build_head(self, dim: int) -> nn.Module:
        """The task's output unit: ``forward(task_feats [B, Q, dim], ctx: HeadContext) -> dict[str, Tensor]``."""

    @property
    def needs_label_counts(self) -> bool:
        """True while an option waits for the training split's label counts (classification's
        ``class_weights: auto``): the model settles it before training with :meth:`set_label_counts`."""
        return False

    def set_label_counts(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """Settle the options that depend on the training split's labels, ``counts`` = ``{class: samples}``.
        Returns the settled options (plain numbers), which the model stores so that a checkpoint rebuilds
        with them rather than with the request (e.g. ``auto``)."""
        raise NotImplementedError(f"{type(self).__qualname__} takes no label counts")

    @abstractmethod
    def loss(self, outputs: dict[str, Tensor], targets: Any, present: Tensor) -> Tensor:
        """Scalar loss, mean over present samples; exactly 0 (attached to the graph) if none is present."""

    @abstractmethod
    def build_metrics(self) -> MetricCollection:
        """A fresh torchmetrics ``MetricCollection`` (cloned per stage by the LightningModule)."""

    @abstractmethod
    def update_metrics(
        self, metrics: MetricCollection, outputs: dict[str, Tensor], targets: Any, present: Tensor
    ) -> None:
        """Update ``metrics`` with the present samples only."""

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """``metrics.compute()`` flattened to scalar tensors (one of them keyed ``primary_metric``).

        Metrics that were never updated (no present sample in the whole stage) are left out rather than
        reported as a meaningless default; non-scalar entries (per-class tensors) are dropped. Under DDP
        "never updated" is decided over all ranks (:func:`metrics_updated`), so every rank takes the same path
        into ``compute()`` (a collective): a rank whose shard had no present sample still joins the sync.
        """
        if not metrics_updated(metrics):
            return {}
        out: dict[str, Tensor] = {}
        for key, value in _flatten(metrics.compute()).items():
            if isinstance(value, Tensor) and value.numel() == 1:
                out[key] = value.reshape(()).float()
        return out

    @abstractmethod
    def postprocess(self, outputs: dict[str, Tensor]) -> list[dict[str, Any]]:
        """Per-sample outputs (class and probabilities, value, mask, boxes...): JSON-able, except numpy arrays
        (segmentation masks), which callers write as files."""

    # ---------------------------------------------------------------- recognition rules
    @classmethod
    def rule_fields(cls, spec: TaskSpec) -> dict[str, str]:
        """The fields a decision rule may test on this task's postprocessed output: ``{field: NUMBER | CLASS}``
        (``CLASS``: a name among ``spec.classes``). Default: none."""
        return {}

    @classmethod
    def rule_value(cls, spec: TaskSpec, output: Mapping[str, Any], field: str) -> Any:
        """Read a rule field from one postprocessed output; ``KeyError`` when the output lacks it."""
        raise KeyError(field)

    # ---------------------------------------------------------------- pictures
    def draw_target(self, canvas: Canvas, target: Any) -> None:
        """Draw one sample's target (``load_target``'s value after the transforms, or a collated row) on the
        canvas. Default: a caption line with the class name or the value."""
        canvas.text(f"{self.name}={_describe(self.spec, target)}")

    def draw_output(self, canvas: Canvas, output: Mapping[str, Any]) -> None:
        """Draw one sample's postprocessed output. Default: its ``class`` or ``value`` as a caption line."""
        if "class" in output:
            canvas.text(f"{self.name}: {output['class']}")
        elif "value" in output:
            canvas.text(f"{self.name}: {float(output['value']):.3g}")

    # ---------------------------------------------------------------- self-description
    @classmethod
    def example_spec(cls) -> TaskSpec:
        """A small valid catalogue entry of this type (contract tests, docs): ``example_<type_name>`` with
        ``example_fields``. Set those, or override this, in every type."""
        if cls.example_fields is None:
            raise NotImplementedError(f"{cls.__qualname__} provides no example_spec()")
        return TaskSpec(name=f"example_{cls.type_name}", type=cls.type_name, **cls.example_fields)

    @classmethod
    def example_label(cls, spec: TaskSpec, root: Path, image_size: tuple[int, int], seed: int = 0) -> Any:
        """A valid manifest value for ``spec`` (may write a file under ``root``, e.g. a mask PNG). ``seed`` varies
        it so that a few labels cover several classes."""
        raise NotImplementedError(f"{cls.__qualname__} provides no example_label()")

    def example_target(self, present: Sequence[bool], image_size: tuple[int, int], seed: int = 0) -> Any:
        """A collated target for a batch (benchmarks, tests): ``example_label`` loaded for the present samples,
        None for the others. Labels that are files (masks) are written to a temporary folder and read back."""
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            per_sample = [
                self.load_target(
                    self.example_label(self.spec, root, image_size, seed=seed + j), root, image_size
                )
                if p
                else None
                for j, p in enumerate(present)
            ]
            return self.collate(per_sample, image_size)

    def output_shapes(
        self, batch_size: int, image_size: tuple[int, int]
    ) -> dict[str, tuple[int, ...]] | None:
        """Shape of every tensor the output unit returns (None: not declared; outputs still lead with B)."""
        return None

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def zero_loss(outputs: dict[str, Tensor]) -> Tensor:
        """A zero on the outputs' device that keeps the graph connected to every floating output (so that DDP
        sees every parameter used and ``backward`` works when no sample of the batch is present)."""
        floats = [v for v in outputs.values() if isinstance(v, Tensor) and v.is_floating_point()]
        if not floats:
            device = next((v.device for v in outputs.values() if isinstance(v, Tensor)), None)
            return torch.zeros((), device=device)
        zero = floats[0].new_zeros(())
        for v in floats:
            # nan_to_num: 0 * NaN would be NaN, and the zero must be exactly zero whatever the outputs hold
            zero = zero + v.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0
        return zero

    @staticmethod
    def present_index(present: Tensor) -> Tensor:
        """present: [B] bool -> LongTensor of the present rows (on ``present``'s device)."""
        return present.nonzero(as_tuple=True)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.name!r})"


def _describe(spec: TaskSpec, target: Any) -> str:
    """A target as caption text: a class index as its name, a number with 3 significant digits."""
    if isinstance(target, Tensor):
        target = target.item() if target.numel() == 1 else target
    if (
        isinstance(target, int)
        and not isinstance(target, bool)
        and spec.classes
        and 0 <= target < len(spec.classes)
    ):
        return spec.classes[target]
    if isinstance(target, float):
        return f"{target:.3g}"
    return str(target)


def metrics_updated(metrics: MetricCollection) -> bool:
    """Whether any metric of ``metrics`` was updated, on any rank when ``torch.distributed`` is initialised.

    Deciding this on the local update count alone would let a rank whose shard held no present sample skip
    ``compute()`` while the others enter its all-gather: a hang, or states synced against the wrong metric.
    Under DDP this is a collective (every rank must call it) that also prepares such a rank's empty list
    states for the sync (:func:`_shape_empty_list_states`).
    """
    local = any(getattr(m, "update_count", 1) > 0 for m in metrics.values())
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    if not any(getattr(m, "sync_on_compute", False) for m in metrics.values()):
        return local  # syncing switched off: compute() is rank-local
    return _shape_empty_list_states(metrics, local)


def _shape_empty_list_states(metrics: MetricCollection, local: bool) -> bool:
    """All-gather (updated?, trailing shape and dtype of each non-empty list state); give this rank's empty
    list states an empty tensor of that shape and dtype; return whether any rank was updated.

    torchmetrics syncs an empty list state (e.g. AUROC's ``preds`` on a rank with no sample) as a 1-D float
    ``tensor([])``, whose shape and dtype do not match the other ranks' ``[n, C]`` tensors, and its padded
    all-gather then fails. The reduction of a ``[0, C]`` tensor of the right dtype adds nothing.
    """
    info: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, m in metrics.items():
        for attr, default in getattr(m, "_defaults", {}).items():  # list states have a list default
            value = getattr(m, attr, None)
            if (
                isinstance(default, list)
                and isinstance(value, list)
                and value
                and isinstance(value[0], Tensor)
            ):
                info[f"{name}.{attr}"] = (
                    tuple(value[0].shape[1:]),
                    str(value[0].dtype).removeprefix("torch."),
                )
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (local, info))
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for _, other in gathered:
        for key, val in other.items():
            shapes.setdefault(key, val)
    for name, m in metrics.items():
        for attr, default in getattr(m, "_defaults", {}).items():
            key = f"{name}.{attr}"
            if isinstance(default, list) and getattr(m, attr, None) == [] and key in shapes:
                trailing, dtype = shapes[key]
                setattr(m, attr, [torch.empty((0, *trailing), dtype=getattr(torch, dtype), device=m.device)])
    return any(flag for flag, _ in gathered)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}" if not prefix else f"{prefix}/{k}"))
        return out
    return {prefix: value}
