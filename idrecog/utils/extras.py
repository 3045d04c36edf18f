"""Optional extras (``pip install 'idrecog[NAME]'``): a command that needs one names it in one line instead of
ending in an ImportError traceback from deep inside a library."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from idrecog.errors import ConfigError

__all__ = ["require_extra"]


def require_extra(extra: str, modules: Sequence[str], what: str) -> None:
    """Raise a :class:`ConfigError` naming ``pip install 'idrecog[extra]'`` when a module of ``modules`` does not
    import (imported here, as the command would import it next anyway)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"{what} needs the optional extra '{extra}' ({', '.join(missing)} not installed): "
            f"pip install 'idrecog[{extra}]'"
        )
