"""Task types and their plugin table."""

from idrecog.tasks.base import CLASS, NUMBER, HeadContext, TaskType
from idrecog.tasks.drawing import Canvas
from idrecog.tasks.registry import (
    create_task_type,
    get_task_type_class,
    list_task_types,
    register_task_type,
)

__all__ = [
    "CLASS",
    "NUMBER",
    "Canvas",
    "HeadContext",
    "TaskType",
    "create_task_type",
    "get_task_type_class",
    "list_task_types",
    "register_task_type",
]
