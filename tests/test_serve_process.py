"""``idrecog serve`` as a process: it refuses to start without API keys (except --insecure on loopback) or
without an audit log, ``idrecog serve-key`` makes and revokes keys, SIGTERM during requests finishes them, and
the Dockerfile runs the server as a non-root user with a readiness health check."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from idrecog.cli import main as idrecog_main
from idrecog.recognition.auth import ApiKeyStore, add_key
from tests.test_recognize import make_tiny_module, save_checkpoint
from tests.test_serve import free_port, png, post, request

ROOT = Path(__file__).resolve().parents[1]


def test_serve_key_makes_and_revokes_keys(tmp_path, capsys):
    keys = tmp_path / "keys.txt"
    assert idrecog_main(["serve-key", "--id", "ops", "--keys_file", str(keys)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("idr_") and key not in keys.read_text()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    store = ApiKeyStore(path=keys, recheck_seconds=0.0)
    assert store.check(key).id == "ops"
    assert idrecog_main(["serve-key", "--id", "ops", "--keys_file", str(keys), "--revoke"]) == 0
    assert "revoked" in keys.read_text()
    assert idrecog_main(["serve-key", "--id", "nobody", "--keys_file", str(keys), "--revoke"]) == 2
    assert "no key with id 'nobody'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ([], {}, "--api_keys: no API keys"),
        (["--insecure", "--host", "0.0.0.0"], {}, "loopback --host only"),
        (["--insecure"], {"IDRECOG_API_KEYS": f"a sha256:{'1' * 64}"}, "API keys are configured"),
        ([], {"IDRECOG_API_KEYS": f"a sha256:{'1' * 64}"}, "--audit.path"),
        ([], {"IDRECOG_API_KEYS": "a sha256:123"}, "IDRECOG_API_KEYS entry 1"),
        (["--api_keys", "missing.txt", "--audit.path", "a.jsonl"], {}, "API key file not found: missing.txt"),
        (["--insecure", "--retention.images", "true"], {}, "need retention.dir"),
    ],
)
def test_serve_refuses_unsafe_settings_before_loading_a_model(
    tmp_path, capsys, monkeypatch, args, env, needle
):
    monkeypatch.delenv("IDRECOG_API_KEYS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # the checkpoint does not exist: each refusal comes before the model is loaded
    assert idrecog_main(["serve", "--ckpt_path", str(tmp_path / "none.ckpt"), *args]) == 2
    assert needle in capsys.readouterr().err


def _wait_ready(proc: subprocess.Popen, port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if request(port, "GET", "/ready")[0] == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None, "server exited"
        assert time.monotonic() < deadline, "server did not get ready"
        time.sleep(0.1)


def _gauge(port: int, key: str, name: str) -> float:
    _, text = request(port, "GET", "/metrics", key=key)
    return next(float(x.split()[-1]) for x in text.decode().splitlines() if x.startswith(name + " "))


def test_sigterm_finishes_the_requests_in_flight(tmp_path):
    ckpt = save_checkpoint(make_tiny_module(), tmp_path / "tiny.ckpt")
    keys, audit = tmp_path / "keys.txt", tmp_path / "audit.jsonl"
    key = add_key(keys, "test")
    port = free_port()
    # a long batch timeout holds the requests inside the server when the signal comes
    limits = {"batch_timeout": 3.0, "max_batch_size": 8, "graceful_timeout": 60}
    cmd = [sys.executable, "-m", "idrecog.cli", "serve", "--ckpt_path", str(ckpt), "--port", str(port),
           "--api_keys", str(keys), "--audit.path", str(audit), "--limits", json.dumps(limits)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, port)
        n = 4
        with ThreadPoolExecutor(n) as pool:
            futures = [
                pool.submit(post, port, [("image", "a.png", png())], {"doc_type": "ald_id_card"}, key)
                for _ in range(n)
            ]
            deadline = time.monotonic() + 60
            while _gauge(port, key, "idrecog_requests_in_flight") < n + 1:  # n + this /metrics request
                assert time.monotonic() < deadline, "the requests did not arrive"
                time.sleep(0.05)  # poll interval
            proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=120) for f in futures]
        # uvicorn re-raises the signal once it has shut down, so the exit status says "ended by SIGTERM"
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert [s for s, _ in answers] == [200] * n, (answers, out)
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert sorted(x["request_id"] for x in lines) == sorted(b["request_id"] for _, b in answers)
    assert all(x["key_id"] == "test" and x["model"].startswith("sha256:") for x in lines)
    assert key not in out


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, argument) pairs of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_idrecog_serve_as_a_non_root_user_with_a_readiness_check():
    steps = _dockerfile()
    final = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
    users = [arg for w, arg in steps[final:] if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [json.loads(arg) for w, arg in steps[final:] if w == "ENTRYPOINT"]
    assert entry and entry[-1][:2] == ["idrecog", "serve"]
    health = [arg for w, arg in steps[final:] if w == "HEALTHCHECK"]
    assert health and "/ready" in health[-1]
    runs = " ".join(arg for w, arg in steps if w == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs  # the CPU build of torch
    assert ".[serve]" in runs
    cmd = [json.loads(arg) for w, arg in steps[final:] if w == "CMD"][-1]
    assert "--insecure" not in cmd and "--api_keys" in cmd and any(a.startswith("--audit.path") for a in cmd)
    assert shlex.join(cmd)  # a list of strings
