"""Importing this module registers the built-in task-query providers (learned, text, multimodal)."""

from idrecog.models.multimodal import MultimodalQueries
from idrecog.models.queries import LearnedQueries
from idrecog.models.queries_text import TextQueries

__all__ = ["LearnedQueries", "MultimodalQueries", "TextQueries"]
