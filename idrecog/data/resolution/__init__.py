"""Task resolution: which catalogue tasks apply to each sample or image.

One interface (:class:`TaskResolver`) and one table (``register_task_resolver`` / ``create_task_resolver`` /
``list_task_resolvers``) for the DataModule (``data.task_resolver``), recognition and serving
(``--task_resolver``). Built in: ``doc_type`` (the catalogue's ``doc_types`` mapping), ``all``, ``doc_type_head`` (recognition: the
unified model's doc-type head), ``classifier`` (a
trained task classifier, :mod:`idrecog.data.resolution.classifier`).
"""

from idrecog.data.resolution.base import (
    ALL_TASKS,
    DOC_TYPE_GIVEN,
    DOC_TYPE_PREDICTED,
    GATE,
    RESOLVERS,
    TASK_CLASSIFIER,
    AllTasksResolver,
    AnnotatedResolver,
    DocTypeHeadResolver,
    DocTypeResolver,
    GateResolver,
    Resolution,
    TaskResolver,
    check_task_resolver_args,
    create_task_resolver,
    list_task_resolvers,
    register_task_resolver,
)
from idrecog.data.resolution.classifier import ClassifierResolver

__all__ = [
    "ALL_TASKS",
    "DOC_TYPE_GIVEN",
    "DOC_TYPE_PREDICTED",
    "GATE",
    "RESOLVERS",
    "TASK_CLASSIFIER",
    "AllTasksResolver",
    "AnnotatedResolver",
    "ClassifierResolver",
    "DocTypeHeadResolver",
    "DocTypeResolver",
    "GateResolver",
    "Resolution",
    "TaskResolver",
    "check_task_resolver_args",
    "create_task_resolver",
    "list_task_resolvers",
    "register_task_resolver",
]
