"""Synthetic identity-document benchmark: fictitious documents of three fictitious countries, photographed.

``generate_dataset`` writes a dataset folder (``tasks.yaml``, ``{split}.jsonl``, images, masks, frames);
``render_sample`` renders one sample in memory (used on the fly by MAE pretraining). See
``docs/synthetic-benchmark.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DOC_TYPES", "generate_dataset", "render_sample"]


def __getattr__(name: str) -> Any:
    # lazy, so that ``idrecog.synth.mrz`` stays importable on its own
    if name in __all__:
        from idrecog.synth import generate

        return getattr(generate, name)
    raise AttributeError(name)
