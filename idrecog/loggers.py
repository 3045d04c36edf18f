"""Loggers. ``WandbLogger``: Lightning's, offline unless a W&B API key is available.

jsonargparse configs cannot branch on the environment, so the choice is made here: ``offline: null`` (the
default) means offline when neither ``WANDB_API_KEY`` is set nor ``WANDB_MODE=online``. Run name and group
default to the query design (``IdrecogCLI`` fills them from the model config).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["WandbLogger", "wandb_offline"]


def wandb_offline() -> bool:
    """No API key and no explicit ``WANDB_MODE=online`` -> offline (nothing leaves the machine)."""
    if os.environ.get("WANDB_MODE", "").lower() == "online":
        return False
    return not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in (
        "offline",
        "disabled",
    )


class WandbLogger(_LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` with ``offline=None`` -> :func:`wandb_offline`.

    Args:
        offline: True / False, or None to decide from the environment.
        group: the W&B run group (the CLI sets the query design when unset).
        tags: run tags.
        **kwargs: the other ``WandbLogger`` / ``wandb.init`` arguments (project, name, save_dir, ...).
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = ".",
        project: str = "idrecog",
        offline: bool | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            offline = wandb_offline()
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            offline=offline,
            group=group,
            tags=list(tags or []),
            log_model=log_model,
            **kwargs,
        )
