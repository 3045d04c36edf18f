"""The plugin table of task types (timm-style ``register_*`` / ``create_*`` / ``list_*``).

A task type is one class (see :class:`idrecog.tasks.base.TaskType`). Registering it makes the name usable as
``type:`` in a catalogue, with no edit inside idrecog::

    from idrecog.tasks import TaskType, register_task_type

    @register_task_type
    class Ordinal(TaskType):
        type_name = "ordinal"
        ...

A plug-in registers on import (import it before the catalogue is read), or, for catalogues read by the
``idrecog`` commands, through an entry point in group ``idrecog.task_types`` of its distribution::

    [project.entry-points."idrecog.task_types"]
    ordinal = "mypkg.tasks:Ordinal"

A catalogue or checkpoint never names a module: ``type: mypkg.tasks:Ordinal`` is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from idrecog.registry import Registry

if TYPE_CHECKING:
    from idrecog.tasks.base import TaskType
    from idrecog.tasks.catalogue import TaskSpec

TASK_TYPES: Registry[TaskType] = Registry(
    "task type", name_attr="type_name", group="idrecog.task_types", builtins="idrecog.tasks.builtin"
)
T = TypeVar("T", bound="type[TaskType]")


def register_task_type(cls: T) -> T:
    """Class decorator: add a :class:`TaskType` subclass to the plugin table under ``cls.type_name``."""
    return TASK_TYPES.register(cls)


def list_task_types() -> list[str]:
    """Names of every registered task type, sorted."""
    return TASK_TYPES.names()


def is_task_type(name: str) -> bool:
    return name in TASK_TYPES


def get_task_type_class(name: str) -> type[TaskType]:
    """The class registered under ``name``; the error lists the valid names."""
    return TASK_TYPES.get(name)


def create_task_type(spec: TaskSpec, **options: Any) -> TaskType:
    """Instantiate the task type of ``spec`` (options override the catalogue entry's ``options``)."""
    cls = get_task_type_class(spec.type)
    return cls(spec, **{**dict(spec.options), **options})
