"""Checkpoint files: read safely (safetensors, or torch files with ``weights_only=True``, never arbitrary pickle)
and written atomically (:func:`atomic_torch_save`, :class:`AtomicCheckpointIO`).

Lightning writes checkpoints through an fsspec transaction whose temporary file lies in the system temp dir; when
that is another filesystem the final move is a copy, so a kill mid-copy leaves a truncated ``last.ckpt``.
:class:`AtomicCheckpointIO` writes ``<name>.tmp-<pid>`` beside the target, fsyncs it and ``os.replace``-s it: a
reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
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
        # torch's message names the refused global on a line of its own ("Unsupported global: GLOBAL ...")
        lines = str(e).splitlines()
        line = next((ln.strip() for ln in lines if "GLOBAL" in ln), lines[0] if lines else "")
        raise ConfigError(
            f"{path}: refused to load: the file needs arbitrary code to unpickle (weights_only=True): {line}"
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


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # the rename itself must reach the disk for the new name to survive a power cut
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (remote URLs keep Lightning's own path)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        fs = get_filesystem(path)
        fs.makedirs(os.path.dirname(str(path)), exist_ok=True)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        # resuming reads a file the user pointed at: no arbitrary code from it (plain tensors and containers)
        if not get_filesystem(path).exists(str(path)):
            raise ConfigError(f"checkpoint not found: {path}")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(
                f"{path}: refused to load: the file needs arbitrary code to unpickle (weights_only=True): "
                + str(e).splitlines()[0]
            ) from None


def plain(value: Any) -> Any:
    """Mappings to dicts and sequences to lists, recursively: hyper-parameters as builtins, since
    ``weights_only=True`` refuses the classes jsonargparse and Lightning wrap them in (Namespace, AttributeDict)."""
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# content hashes by (path, modification time, size): a checkpoint is hashed once per process
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Content hash of a file (memoised per path, modification time and size)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]
