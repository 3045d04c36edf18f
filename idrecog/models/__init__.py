"""Model parts: the ViT encoder, task queries, the task decoder, the pixel decoder, the task-guided
interpreter, and the unified model that wires them."""

from idrecog.models.decoder import TaskDecoder
from idrecog.models.encoder import ViTEncoder
from idrecog.models.interpreter import TaskGuidedInterpreter
from idrecog.models.pixel_decoder import PixelDecoder
from idrecog.models.queries import (
    LearnedQueries,
    TaskQueryProvider,
    create_query_provider,
    list_query_providers,
    register_query_provider,
)
from idrecog.models.unified import UnifiedModel

__all__ = [
    "LearnedQueries",
    "PixelDecoder",
    "TaskDecoder",
    "TaskGuidedInterpreter",
    "TaskQueryProvider",
    "UnifiedModel",
    "ViTEncoder",
    "create_query_provider",
    "list_query_providers",
    "register_query_provider",
]
