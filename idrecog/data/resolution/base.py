"""Task resolvers: which catalogue tasks apply to each sample (timm-style ``register_*`` / ``create_*`` / ``list_*``).

One interface, two entry points:

* :meth:`TaskResolver.resolve` (datasets): the samples of a split -> task names per sample. The DataModule calls
  it once per split (``data.task_resolver``, ``data.resolver_args``).
* :meth:`TaskResolver.resolve_batch` (recognition and serving): a batch of images with their doc types (None when
  unknown) and the unified model's outputs -> a :class:`Resolution` per image (tasks, how they were decided,
  doc type). A given doc type always decides through the catalogue's ``doc_types`` mapping; a resolver decides
  the others in :meth:`TaskResolver.resolve_unknown`.

Built in: ``doc_type`` (the mapping), ``all``, ``doc_type_head`` (recognition: the unified model's own doc-type
head) and ``classifier`` (a trained task classifier). Another resolver plugs in behind the same interface::

    @register_task_resolver
    class MyResolver(TaskResolver):
        name = "my_resolver"
        def resolve(self, samples, split): ...
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from idrecog.data.manifest import Sample
from idrecog.errors import ConfigError
from idrecog.registry import Registry
from idrecog.tasks.catalogue import TaskCatalogue

# how an image's tasks were decided (``tasks.how`` in recognition records)
DOC_TYPE_GIVEN = "doc_type given"
DOC_TYPE_PREDICTED = "doc_type predicted"  # the unified model's doc-type head
ALL_TASKS = "all"
TASK_CLASSIFIER = "task classifier"
GATE = "gate"


@dataclass(frozen=True)
class Resolution:
    """The tasks that apply to one image (catalogue order), how that was decided, and its doc type if known."""

    tasks: list[str]
    how: str
    doc_type: str | None = None
    #: what the resolver read to decide (probabilities...), reported by recognition
    details: dict[str, Any] = field(default_factory=dict)


class TaskResolver(ABC):
    """Maps samples to the names of the tasks that apply to them (catalogue order)."""

    name: ClassVar[str]
    #: training: the unified model's gate decides, per step, which tasks of a sample whose task set is unknown
    #: (``known`` False) it trains (the dataset marks those samples ``gate_decides``)
    model_decides_unknown: ClassVar[bool] = False

    def __init__(self, catalogue: TaskCatalogue) -> None:
        self.catalogue = catalogue

    @classmethod
    def check_args(cls, **kwargs: Any) -> None:
        """Cheap, catalogue-free checks of ``data.resolver_args`` (e.g. a file exists), run when the DataModule
        is built so that a bad value fails before any data is generated or read. Default: none."""
        return None

    @abstractmethod
    def resolve(self, samples: list[Sample], split: str) -> list[list[str]]:
        """Task names per sample, in catalogue order; an empty list means no task applies."""

    def describe(self) -> str:
        """One line for logs: the resolver and its settings."""
        return f"{self.name}"

    def ordered(self, tasks: Sequence[str]) -> list[str]:
        """``tasks`` in catalogue order."""
        keep = set(tasks)
        return [t for t in self.catalogue.names if t in keep]

    def known(self, samples: list[Sample]) -> list[bool]:
        """Per sample, whether its task set is known rather than assumed (a sample whose tasks were assumed
        teaches the gate nothing about applicability). Default: known."""
        return [True] * len(samples)

    def resolve_batch(
        self,
        doc_types: Sequence[str | None],
        images: Tensor | None = None,
        outputs: Sequence[Mapping[str, Any]] | None = None,
        routing: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Resolution]:
        """Recognition: one :class:`Resolution` per image. ``images``: [N, 3, H, W] as the model reads them;
        ``outputs`` / ``routing``: the unified model's per-image outputs and gate decisions (``predict_step``'s).
        A given doc type decides through the ``doc_types`` mapping; the others go to :meth:`resolve_unknown`."""
        res: list[Resolution | None] = [
            Resolution(self.ordered(self.catalogue.tasks_for(dt)), DOC_TYPE_GIVEN, dt)
            if dt is not None
            else None
            for dt in doc_types
        ]
        unknown = [i for i, r in enumerate(res) if r is None]
        if unknown:
            decided = self.resolve_unknown(
                images[unknown] if images is not None else None,
                [outputs[i] for i in unknown] if outputs is not None else None,
            )
            if len(decided) != len(unknown):
                raise ConfigError(
                    f"task resolver {self.name!r} returned {len(decided)} results for {len(unknown)} images"
                )
            for i, r in zip(unknown, decided, strict=True):
                res[i] = r
        return res  # type: ignore[return-value]

    def resolve_unknown(
        self, images: Tensor | None, outputs: Sequence[Mapping[str, Any]] | None
    ) -> list[Resolution]:
        """Recognition of images without a doc type. Default: every task applies."""
        n = images.shape[0] if images is not None else len(outputs or ())
        return [Resolution(list(self.catalogue.names), ALL_TASKS) for _ in range(n)]

    def summary(self, resolved: list[list[str]]) -> dict[str, int]:
        """How many samples each task applies to."""
        counts = Counter(t for names in resolved for t in names)
        return {t: counts.get(t, 0) for t in self.catalogue.names}


RESOLVERS: Registry[TaskResolver] = Registry(
    "task resolver", TaskResolver, group="idrecog.task_resolvers", builtins="idrecog.data.resolution"
)
R = TypeVar("R", bound="type[TaskResolver]")


def register_task_resolver(cls: R) -> R:
    """Class decorator: add a :class:`TaskResolver` subclass under ``cls.name``."""
    return RESOLVERS.register(cls)


def list_task_resolvers() -> list[str]:
    """Names of the registered task resolvers, sorted."""
    return RESOLVERS.names()


def create_task_resolver(name: str, catalogue: TaskCatalogue, **kwargs: Any) -> TaskResolver:
    """Instantiate a registered resolver; unknown names and bad arguments raise ``ConfigError``."""
    cls = RESOLVERS.get(name, field="data.task_resolver")
    try:
        return cls(catalogue, **kwargs)
    except TypeError as e:
        raise ConfigError(f"data.resolver_args: bad arguments for task resolver {name!r}: {e}") from None


def check_task_resolver_args(name: str, resolver_args: dict[str, Any] | None = None) -> None:
    """Fail fast on ``data.resolver_args`` of a registered resolver: unknown keywords and the resolver's own
    :meth:`TaskResolver.check_args`. Unknown resolver names are left to :func:`create_task_resolver`."""
    if name not in RESOLVERS:
        return
    cls = RESOLVERS.get(name)
    kwargs = dict(resolver_args or {})
    try:
        inspect.signature(cls.__init__).bind(None, None, **kwargs)
    except TypeError as e:
        raise ConfigError(f"data.resolver_args: bad arguments for task resolver {name!r}: {e}") from None
    cls.check_args(**kwargs)


@register_task_resolver
class DocTypeResolver(TaskResolver):
    """Tasks from ``catalogue.tasks_for(sample.doc_type)``.

    Args:
        missing: what a sample without ``doc_type`` gets: ``"all"`` (every task; the labels that are null
            stay masked) or ``"skip"`` (no task: the sample is dropped from training).
    """

    name = "doc_type"
    MISSING = ("all", "skip")

    def __init__(self, catalogue: TaskCatalogue, missing: str = "all") -> None:
        super().__init__(catalogue)
        if missing not in self.MISSING:
            raise ConfigError(f"data.resolver_args.missing must be one of {self.MISSING}, got {missing!r}")
        self.missing = missing

    def resolve(self, samples: list[Sample], split: str) -> list[list[str]]:
        out = []
        for s in samples:
            if s.doc_type is None:
                out.append(self.catalogue.names if self.missing == "all" else [])
            else:
                applies = set(self.catalogue.tasks_for(s.doc_type))
                out.append([t for t in self.catalogue.names if t in applies])
        return out

    def describe(self) -> str:
        mapping = (
            "doc_types mapping" if self.catalogue.doc_types is not None else "no doc_types mapping: all tasks"
        )
        return f"{self.name} ({mapping}; samples without doc_type: {self.missing})"

    def resolve_unknown(
        self, images: Tensor | None, outputs: Sequence[Mapping[str, Any]] | None
    ) -> list[Resolution]:
        n = images.shape[0] if images is not None else len(outputs or ())
        tasks = list(self.catalogue.names) if self.missing == "all" else []
        return [Resolution(tasks, ALL_TASKS) for _ in range(n)]

    def known(self, samples: list[Sample]) -> list[bool]:
        # without a doc type the task set is assumed (all, or none)
        return [s.doc_type is not None or self.catalogue.doc_types is None for s in samples]


@register_task_resolver
class AllTasksResolver(TaskResolver):
    """Every task applies to every sample (null labels stay masked)."""

    name = "all"

    def resolve(self, samples: list[Sample], split: str) -> list[list[str]]:
        return [self.catalogue.names for _ in samples]

    def known(self, samples: list[Sample]) -> list[bool]:
        return [
            self.catalogue.doc_types is None for _ in samples
        ]  # assumed, unless every task always applies

    def resolve_batch(
        self,
        doc_types: Sequence[str | None],
        images: Tensor | None = None,
        outputs: Sequence[Mapping[str, Any]] | None = None,
        routing: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Resolution]:
        return [Resolution(list(self.catalogue.names), ALL_TASKS, dt) for dt in doc_types]


@register_task_resolver
class AnnotatedResolver(TaskResolver):
    """The task set an annotator recorded for each sample (the manifest's ``tasks``); a sample without one falls
    back to the doc type's tasks (``DocTypeResolver``, whose ``missing`` it takes). The oracle of the comparisons
    in docs/task-resolution.md."""

    name = "annotated"

    def __init__(self, catalogue: TaskCatalogue, missing: str = "all") -> None:
        super().__init__(catalogue)
        self.fallback = DocTypeResolver(catalogue, missing=missing)

    def resolve(self, samples: list[Sample], split: str) -> list[list[str]]:
        by_doc_type = self.fallback.resolve(samples, split)
        return [
            self.ordered(s.tasks) if s.tasks is not None else d
            for s, d in zip(samples, by_doc_type, strict=True)
        ]

    def known(self, samples: list[Sample]) -> list[bool]:
        # where some samples carry a task set, the doc type's tasks of the others are assumed, not known
        if any(s.tasks is not None for s in samples):
            return [s.tasks is not None for s in samples]
        return self.fallback.known(samples)


@register_task_resolver
class GateResolver(AnnotatedResolver):
    """The unified model's gate decides which tasks apply to each image.

    Recognition: among the doc type's tasks when it is given, else among all, a task applies where its
    applies-probability is at least 0.5; one that applies but whose required inputs are missing stays in the set
    and recognition withholds it with the reason. Training: a sample with an annotated task set (the manifest's
    ``tasks``) trains those tasks; for one without, the gate (trained on the annotated samples) decides at each
    step which of its doc type's tasks train (the dataset marks it ``gate_decides``)."""

    name = "gate"
    model_decides_unknown = True

    def known(self, samples: list[Sample]) -> list[bool]:
        return [s.tasks is not None for s in samples]

    def describe(self) -> str:
        return f"{self.name} (annotated task sets; the model's gate decides for samples without one)"

    def resolve_batch(
        self,
        doc_types: Sequence[str | None],
        images: Tensor | None = None,
        outputs: Sequence[Mapping[str, Any]] | None = None,
        routing: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Resolution]:
        if routing is None:
            raise ConfigError("task resolver 'gate' needs the model's routing (predict_step's 'routing')")
        out = []
        for dt, r in zip(doc_types, routing, strict=True):
            among = self.catalogue.tasks_for(dt) if dt is not None else self.catalogue.names
            tasks = [t for t in among if r.get(t, {}).get("open", False)]
            out.append(Resolution(self.ordered(tasks), GATE, dt))
        return out


@register_task_resolver
class DocTypeHeadResolver(TaskResolver):
    """Recognition: an image without a doc type gets the tasks of the doc type the unified model's own doc-type
    head predicts (its output in ``outputs``); without such a head, every task.

    Args:
        doc_type_task: the classification task whose classes are the doc types; ``"auto"``: the catalogue's
            (:attr:`TaskCatalogue.doc_type_task`); None: no head (every task applies to unknown images).
    """

    name = "doc_type_head"

    def __init__(self, catalogue: TaskCatalogue, doc_type_task: str | None = "auto") -> None:
        super().__init__(catalogue)
        if doc_type_task == "auto":
            doc_type_task = catalogue.doc_type_task
        elif doc_type_task is not None and doc_type_task not in catalogue:
            raise ConfigError(f"doc_type_task {doc_type_task!r} is not a task of the model")
        self.doc_type_task = doc_type_task

    def resolve(self, samples: list[Sample], split: str) -> list[list[str]]:
        if any(s.doc_type is None for s in samples):
            raise ConfigError(
                f"task resolver {self.name!r} reads the unified model's outputs: it resolves images in "
                "recognition, not dataset samples without doc_type (use doc_type or classifier)"
            )
        return DocTypeResolver(self.catalogue).resolve(samples, split)

    def resolve_unknown(
        self, images: Tensor | None, outputs: Sequence[Mapping[str, Any]] | None
    ) -> list[Resolution]:
        out = []
        for o in outputs or [{} for _ in range(images.shape[0] if images is not None else 0)]:
            head = o.get(self.doc_type_task) if self.doc_type_task is not None else None
            if head is not None and head.get("class") in (self.catalogue.doc_types or {}):
                dt = head["class"]
                out.append(Resolution(self.ordered(self.catalogue.tasks_for(dt)), DOC_TYPE_PREDICTED, dt))
            else:
                out.append(Resolution(list(self.catalogue.names), ALL_TASKS))
        return out

    def describe(self) -> str:
        return f"{self.name} (head: {self.doc_type_task})"
