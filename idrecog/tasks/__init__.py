"""Task types and their plugin table."""

from idrecog.tasks.base import HeadContext, TaskType
from idrecog.tasks.registry import (
    create_task_type,
    get_task_type_class,
    list_task_types,
    register_task_type,
)

__all__ = [
    "HeadContext",
    "TaskType",
    "create_task_type",
    "get_task_type_class",
    "list_task_types",
    "register_task_type",
]
