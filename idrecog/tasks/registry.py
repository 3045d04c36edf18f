"""The plugin table of task types (timm-style ``register_*`` / ``create_*`` / ``list_*``).

A task type is one class (see :class:`idrecog.tasks.base.TaskType`). Registering it from any module makes the
name usable as ``type:`` in a catalogue, with no edit inside idrecog::

    from idrecog.tasks import TaskType, register_task_type

    @register_task_type
    class Ordinal(TaskType):
        type_name = "ordinal"
        ...

The catalogue may also name a type by import path (``type: mypkg.tasks:Ordinal``); the module is imported
and its class registered on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, TypeVar

from idrecog.errors import ConfigError

if TYPE_CHECKING:
    from idrecog.data.catalogue import TaskSpec
    from idrecog.tasks.base import TaskType

_TASK_TYPES: dict[str, type[TaskType]] = {}
T = TypeVar("T", bound="type[TaskType]")


def register_task_type(cls: T) -> T:
    """Class decorator: add a :class:`TaskType` subclass to the plugin table under ``cls.type_name``."""
    name = getattr(cls, "type_name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__qualname__} must set a non-empty class attribute 'type_name'")
    existing = _TASK_TYPES.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ConfigError(
            f"task type {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
        )
    _TASK_TYPES[name] = cls
    return cls


def _ensure_builtins() -> None:
    import idrecog.tasks.builtin  # noqa: F401  (registers the built-in types)


def _try_import(name: str) -> None:
    # "package.module:Class" or "package.module.Class": import so that its decorator registers it.
    if ":" in name:
        mod = name.split(":", 1)[0]
    elif "." in name:
        mod = name.rsplit(".", 1)[0]
    else:
        return
    try:
        module = importlib.import_module(mod)
    except ImportError:
        return
    cls_name = name.split(":", 1)[1] if ":" in name else name.rsplit(".", 1)[1]
    cls = getattr(module, cls_name, None)
    if cls is not None and name not in _TASK_TYPES:
        _TASK_TYPES[name] = cls


def list_task_types() -> list[str]:
    """Names of every registered task type, sorted."""
    _ensure_builtins()
    return sorted(_TASK_TYPES)


def is_task_type(name: str) -> bool:
    _ensure_builtins()
    if name not in _TASK_TYPES:
        _try_import(name)
    return name in _TASK_TYPES


def get_task_type_class(name: str) -> type[TaskType]:
    """The class registered under ``name``; the error lists the valid names."""
    if not is_task_type(name):
        raise ConfigError(f"unknown task type {name!r}; registered: {', '.join(list_task_types())}")
    return _TASK_TYPES[name]


def create_task_type(spec: TaskSpec, **options: Any) -> TaskType:
    """Instantiate the task type of ``spec`` (options override the catalogue entry's ``options``)."""
    cls = get_task_type_class(spec.type)
    return cls(spec, **{**dict(spec.options), **options})
