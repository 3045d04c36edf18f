"""Loading weight files safely: safetensors, or torch files with ``weights_only=True`` (never arbitrary pickle)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idrecog.errors import ConfigError


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ``.ckpt``/``.pt`` file with ``weights_only=True``; a pickle that needs code is refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"{path}: refused to load: the file needs arbitrary code to unpickle (weights_only=True): {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConfigError(f"{path}: not a readable checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def load_weights_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A flat state dict and string metadata from a safetensors file, a Lightning checkpoint or a state dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    obj = load_checkpoint(path)
    meta: dict[str, str] = {}
    hp = obj.get("hyper_parameters") or {}
    grid = _find_grid(hp)
    if grid:
        meta["grid_size"] = f"{grid[0]},{grid[1]}"
    for key in ("state_dict", "model", "model_state", "module"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    return state, meta


def _find_grid(hp: Any) -> tuple[int, int] | None:
    """Find the encoder's img_size and patch size in saved hyper-parameters (best effort)."""
    if isinstance(hp, dict):
        if "img_size" in hp and isinstance(hp.get("img_size"), list | tuple) and "name" in hp:
            name = str(hp["name"])
            try:
                p = int(name.split("patch")[1].split("_")[0])
            except (IndexError, ValueError):
                return None
            h, w = hp["img_size"]
            return int(h) // p, int(w) // p
        for v in hp.values():
            g = _find_grid(v)
            if g:
                return g
    elif hasattr(hp, "__dict__"):
        return _find_grid(vars(hp))
    return None
