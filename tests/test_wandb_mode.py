"""Whether W&B logs online: credentials -> online, none -> offline, explicit settings win (no network: the
decision reads the environment and files only, and loggers are built without starting a run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from idrecog.loggers import WandbLogger, wandb_mode

REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef0123456789abcdef01234567"  # the 40-character form of a W&B API key
WANDB_VARS = (
    "WANDB_MODE",
    "WANDB_API_KEY",
    "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_BASE_URL",
    "WANDB_DIR",
    "NETRC",
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine with no W&B set-up: empty HOME and config dir, no W&B variables, a fresh working directory."""
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    (home / ".config" / "wandb").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


def wandb_login(host: str = "https://api.wandb.ai") -> None:
    """What `wandb login` leaves behind: the key in the netrc file, written by wandb's own code."""
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:  # wandb before its wbauth module: the same netrc entry, written here
        path = Path("~/.netrc").expanduser()
        path.write_text(f"machine {host.split('://')[-1]}\n  login user\n  password {KEY}\n")
        path.chmod(0o600)
        return
    wbauth.write_netrc_auth(host=host, api_key=KEY)
    assert wbauth.read_netrc_auth(host=host) == KEY  # and wandb itself finds it there


def test_no_credentials_is_offline(home: Path) -> None:
    mode, why = wandb_mode()
    assert mode == "offline" and "wandb login" in why


def test_api_key_in_the_environment_is_online(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_mode() == ("online", "WANDB_API_KEY is set")


def test_wandb_login_is_online(home: Path) -> None:
    wandb_login()
    mode, why = wandb_mode()
    assert mode == "online" and str(home / ".netrc") in why


def test_login_to_another_server_counts_for_that_server_only(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb_login("https://wandb.example.com")
    assert wandb_mode()[0] == "offline"  # the key is not for api.wandb.ai
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert wandb_mode()[0] == "online"
    monkeypatch.delenv("WANDB_BASE_URL")
    (home / ".config" / "wandb" / "settings").write_text("[default]\nbase_url = https://wandb.example.com\n")
    assert wandb_mode()[0] == "online"  # the server named by `wandb login --host` (global settings)


@pytest.mark.parametrize(
    ("value", "mode"), [("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled")]
)
def test_wandb_mode_variable_wins_over_credentials(
    home: Path, monkeypatch: pytest.MonkeyPatch, value: str, mode: str
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    wandb_login()
    monkeypatch.setenv("WANDB_MODE", value)
    assert wandb_mode() == (mode, f"WANDB_MODE={value}")


def test_wandb_mode_online_without_credentials_is_kept(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode()[0] == "online"  # wandb will ask for a key: the user said so


def test_wandb_offline_command_wins_over_login(home: Path) -> None:
    wandb_login()
    Path("wandb").mkdir()
    Path("wandb/settings").write_text("[default]\nmode = offline\n")  # what `wandb offline` writes here
    mode, why = wandb_mode()
    assert mode == "offline" and "wandb/settings" in why


def test_logger_follows_the_decision_and_explicit_offline_wins(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = str(home / "runs")
    assert WandbLogger(save_dir=save)._offline  # no credentials
    assert not WandbLogger(save_dir=save, offline=False)._offline  # explicit online
    wandb_login()
    assert not WandbLogger(save_dir=save)._offline
    assert WandbLogger(save_dir=save, offline=True)._offline  # explicit offline
    assert "WANDB_MODE" not in os.environ  # no run was started (Lightning sets it when one starts offline)


def test_the_command_does_not_force_offline(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from idrecog.cli import main

    try:
        main(["synth", "--help"])
    except SystemExit:
        pass
    assert "WANDB_MODE" not in os.environ


def test_sweep_agent_runs_online_when_logged_in(home: Path, tiny_dataset: Path) -> None:
    from idrecog.cli.train import build_cli
    from tests.test_wandb_compare import SMALL, sweep_command

    wandb_login()
    cmd = sweep_command({"model.queries": "learned", "seed_everything": 1})
    argv = [a.replace("lightning_configs/", f"{REPO}/lightning_configs/") for a in cmd[3:]]
    cli = build_cli(
        [*argv, f"--data.root={tiny_dataset}", f"--trainer.default_root_dir={home}/run", *SMALL], run=False
    )
    (logger,) = (lg for lg in cli.trainer.loggers if type(lg).__name__ == "WandbLogger")
    assert not logger._offline and logger._wandb_init["name"] == "learned-s1"
