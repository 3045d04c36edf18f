"""Task resolvers: which catalogue tasks apply to each sample (timm-style ``register_*`` / ``create_*`` / ``list_*``).

The built-in ``doc_type`` resolver reads the sample's ``doc_type`` and the catalogue's ``doc_types`` mapping.
Another resolver (say, a document-type classifier run over the images) plugs in behind the same interface::

    @register_task_resolver
    class MyResolver(TaskResolver):
        name = "my_resolver"
        def resolve(self, samples, split): ...

and is chosen with ``data.task_resolver: my_resolver`` (``data.resolver_args`` are its keyword arguments).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, ClassVar, TypeVar

from idrecog.data.catalogue import TaskCatalogue
from idrecog.data.manifest import Sample
from idrecog.errors import ConfigError

_RESOLVERS: dict[str, type[TaskResolver]] = {}
R = TypeVar("R", bound="type[TaskResolver]")


class TaskResolver(ABC):
    """Maps samples to the names of the tasks that apply to them (catalogue order)."""

    name: ClassVar[str]

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

    def summary(self, resolved: list[list[str]]) -> dict[str, int]:
        """How many samples each task applies to."""
        counts = Counter(t for names in resolved for t in names)
        return {t: counts.get(t, 0) for t in self.catalogue.names}


def register_task_resolver(cls: R) -> R:
    """Class decorator: add a :class:`TaskResolver` subclass under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__qualname__} must set a non-empty class attribute 'name'")
    existing = _RESOLVERS.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ConfigError(
            f"task resolver {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
        )
    _RESOLVERS[name] = cls
    return cls


def list_task_resolvers() -> list[str]:
    """Names of the registered task resolvers, sorted."""
    return sorted(_RESOLVERS)


def create_task_resolver(name: str, catalogue: TaskCatalogue, **kwargs: Any) -> TaskResolver:
    """Instantiate a registered resolver; unknown names and bad arguments raise ``ConfigError``."""
    if name not in _RESOLVERS:
        raise ConfigError(
            f"data.task_resolver: unknown task resolver {name!r}; registered: {', '.join(list_task_resolvers())}"
        )
    try:
        return _RESOLVERS[name](catalogue, **kwargs)
    except TypeError as e:
        raise ConfigError(f"data.resolver_args: bad arguments for task resolver {name!r}: {e}") from None


def check_task_resolver_args(name: str, resolver_args: dict[str, Any] | None = None) -> None:
    """Fail fast on ``data.resolver_args`` of a registered resolver: unknown keywords and the resolver's own
    :meth:`TaskResolver.check_args`. Unknown resolver names are left to :func:`create_task_resolver`."""
    cls = _RESOLVERS.get(name)
    if cls is None:
        return
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


@register_task_resolver
class AllTasksResolver(TaskResolver):
    """Every task applies to every sample (null labels stay masked)."""

    name = "all"

    def resolve(self, samples: list[Sample], split: str) -> list[list[str]]:
        return [self.catalogue.names for _ in samples]


# built-in resolvers defined in their own modules register on import (at the end: they import this module)
from idrecog.data import classifier_resolver as _classifier_resolver  # noqa: E402, F401
