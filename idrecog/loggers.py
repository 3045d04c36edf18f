"""Loggers. ``WandbLogger``: Lightning's, online when W&B credentials exist and offline otherwise.

jsonargparse configs cannot branch on the environment, so the choice is made here (:func:`wandb_mode`), in the
order wandb itself applies its settings (``wandb.login``'s documentation):

1. an explicit mode wins: the logger's ``offline: true|false``, then ``WANDB_MODE``, then the ``mode`` a settings
   file holds (``wandb offline`` writes ``mode = offline`` into ``./wandb/settings``);
2. otherwise credentials decide: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, the API key ``wandb login``
   saved in the netrc file (``$NETRC``, else ``~/.netrc``) for the W&B host (``WANDB_BASE_URL``, a settings
   file's ``base_url``, else ``https://api.wandb.ai``), or an ``api_key`` in a settings file -> online;
3. no credentials -> offline: the run is written under ``save_dir/wandb/offline-run-*`` and ``wandb sync``
   uploads it later; nothing leaves the machine.

Run name and group default to the query design (``IdrecogCLI`` fills them from the model config).
"""

from __future__ import annotations

import configparser
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["WandbLogger", "wandb_mode", "wandb_offline"]

WandbMode = Literal["online", "offline", "disabled"]
DEFAULT_BASE_URL = "https://api.wandb.ai"
# wandb's mode values (wandb.Settings.mode) -> what they mean for a run
_MODES: dict[str, WandbMode] = {
    "online": "online",
    "run": "online",
    "shared": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def _settings_files(env: Mapping[str, str]) -> list[Path]:
    """wandb's settings files, lowest precedence first: the global one, then the workspace one."""
    config_dir = env.get("WANDB_CONFIG_DIR")
    global_file = (
        Path(config_dir, "settings") if config_dir else Path("~/.config/wandb/settings").expanduser()
    )
    root = Path(env.get("WANDB_DIR") or os.getcwd())
    workspace = root / (".wandb" if (root / ".wandb").exists() else "wandb") / "settings"
    return [global_file, workspace]


def _read_settings(env: Mapping[str, str]) -> dict[str, tuple[str, Path]]:
    """The ``[default]`` entries of the settings files (workspace over global): key -> (value, file)."""
    out: dict[str, tuple[str, Path]] = {}
    for path in _settings_files(env):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # wandb, too, reads an unreadable settings file as empty
        if parser.has_section("default"):
            out.update({k: (v, path) for k, v in parser.items("default")})
    return out


def _netrc_key(host_url: str, env: Mapping[str, str]) -> Path | None:
    """The netrc file holding a password (the API key ``wandb login`` saved) for ``host_url``'s host."""
    path = Path(env["NETRC"]).expanduser() if env.get("NETRC") else Path("~/.netrc").expanduser()
    host = urlsplit(host_url).netloc
    if not host or not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return None
    return path if entry and entry[2] else None


def wandb_mode(environ: Mapping[str, str] | None = None) -> tuple[WandbMode, str]:
    """How a W&B run started now would log, and why: ``("online" | "offline" | "disabled", reason)``.

    Explicit settings win (``WANDB_MODE``, a settings file's ``mode``); otherwise online exactly when wandb
    would find credentials without asking. Reads files only; no network.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("WANDB_MODE", "").strip().lower()
    if explicit:
        return _MODES.get(explicit, "online"), f"WANDB_MODE={explicit}"
    settings = _read_settings(env)
    if "mode" in settings:
        value, path = settings["mode"]
        return _MODES.get(value.strip().lower(), "online"), f"mode = {value} in {path}"
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if env.get(var):
            return "online", f"{var} is set"
    base_url = env.get("WANDB_BASE_URL") or settings.get("base_url", (DEFAULT_BASE_URL, None))[0]
    netrc_file = _netrc_key(base_url, env)
    if netrc_file is not None:
        return "online", f"an API key for {urlsplit(base_url).netloc} in {netrc_file} (`wandb login`)"
    if "api_key" in settings:
        return "online", f"api_key in {settings['api_key'][1]}"
    return "offline", "no W&B credentials (set WANDB_API_KEY or run `wandb login` to log online)"


def wandb_offline(environ: Mapping[str, str] | None = None) -> bool:
    """True when :func:`wandb_mode` says offline (nothing leaves the machine)."""
    return wandb_mode(environ)[0] == "offline"


class WandbLogger(_LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` with ``offline=None`` -> :func:`wandb_mode`.

    Args:
        offline: True / False (explicit), or None: online when W&B credentials exist, else offline.
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
            # "disabled" is left to wandb itself (it reads WANDB_MODE / the settings file too): offline=False
            mode, why = wandb_mode()
            offline = mode == "offline"
            rank_zero_info(f"[idrecog] W&B logs {mode}: {why}")
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
