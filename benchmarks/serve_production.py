"""The production server on loopback: ``idrecog serve`` with API keys and an audit log under concurrent load,
stalled uploads, an injected model fault and SIGTERM during load.

    python -m benchmarks.serve_production [--seconds 8] [--clients 1 8 32] [--model tiny|default]

Phases, each against a server in another process on 127.0.0.1:

1. load: N concurrent clients (each sends its next request when the last is answered) for ``--seconds``; 5xx
   count, p50/p99 latency, images/s, the server's mean batch size and its resident memory (VmRSS) before
   and after each N;
2. slow clients: ``--stalled`` connections send half a body and stall while 8 clients load the server;
   their latency against the load phase at N=8, and when the stalled ones got their 408;
3. SIGTERM during load: 16 clients, the signal after half of ``--seconds``; every request is answered 200,
   refused at connect (the port closed), or lost after it was sent; the audit log says how many requests the
   server accepted (one line each), which must equal the 200s the clients got;
4. a model fault: a second server (this script in ``--fault_server`` mode: the same ``serve()`` with a
   recognizer that raises for the id ``inject-fault``) under 8 clients; one request carries that id.

Without ``--ckpt_path`` a randomly initialised model is saved to a temporary checkpoint: ``tiny`` (a 1-block
ViT of width 32, as the tests build it) or ``default`` (the default UnifiedModule: vit_tiny, 160x256).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import multipart_body

FAULT_ID = "inject-fault"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _get(port: int, path: str, key: str | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _metric(port: int, key: str, name: str) -> float:
    text = _get(port, "/metrics", key)[1].decode()
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + " ")), 0.0)


def make_checkpoint(kind: str, path: Path) -> Path:
    import torch

    from idrecog.lit.unified import UnifiedModule

    torch.manual_seed(0)
    if kind == "tiny":
        from idrecog.models.decoder import TaskDecoder
        from idrecog.models.encoder import ViTEncoder
        from idrecog.models.interpreter import TaskGuidedInterpreter

        m = UnifiedModule(
            encoder=ViTEncoder("vit_tiny_patch16_224", img_size=(64, 96), depth=1, embed_dim=32, num_heads=2),
            decoder=TaskDecoder(dim=32, depth=1, num_heads=2),
            interpreter=TaskGuidedInterpreter(guidance_hidden=16),
        )
    else:
        m = UnifiedModule()
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    return path


class Server:
    """A server process: started, waited for on /ready, stopped; its output goes to a log file."""

    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        self.port, self.log = port, log
        self._out = open(log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                if _get(port, "/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"server did not get ready; see {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._out.close()


def _bodies(n: int = 8) -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (320, 512, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(
            multipart_body([("image", "a.jpg", buf.getvalue())], {"doc_type": "ald_id_card", "id": str(i)})
        )
    return out


def one_request(
    port: int, key: str, body: bytes, ctype: str
) -> tuple[str, int, float, dict[str, Any] | None]:
    """(outcome, status, seconds, JSON answer): outcome is ``answered``, ``refused`` (no connection) or
    ``lost`` (the connection broke after the request was sent, without an answer)."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        try:
            c.connect()
        except ConnectionRefusedError:
            return "refused", 0, time.perf_counter() - t0, None
        try:
            c.request("POST", "/recognize", body=body, headers={"Content-Type": ctype, "X-API-Key": key})
            r = c.getresponse()
            data = r.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            return "lost", 0, time.perf_counter() - t0, None
        dt = time.perf_counter() - t0
        answer = json.loads(data) if data.startswith(b"{") else None
        return "answered", r.status, dt, answer
    finally:
        c.close()


def run_clients(
    port: int, key: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float,
    stop_on_refused: bool = False, special: tuple[int, bytes, str] | None = None,
) -> tuple[list[tuple[str, int, float, dict[str, Any] | None]], float]:  # fmt: skip
    """``clients`` threads, each sending its next request when the last is answered, until ``seconds``
    (or, with ``stop_on_refused``, until the port refuses). ``special``: (index, body, ctype) sent once by
    client 0 as its index-th request."""
    results: list[tuple[str, int, float, dict[str, Any] | None]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(c: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            body, ctype = bodies[(c + i) % len(bodies)]
            if special is not None and c == 0 and i == special[0]:
                body, ctype = special[1], special[2]
            r = one_request(port, key, body, ctype)
            with lock:
                results.append(r)
            i += 1
            if r[0] == "refused" and stop_on_refused:
                return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summarise(results: list[tuple[str, int, float, dict[str, Any] | None]], wall: float) -> dict[str, Any]:
    lat = sorted(r[2] for r in results if r[1] == 200)
    statuses = Counter(r[1] for r in results if r[0] == "answered")
    return {
        "requests": len(results),
        "ok": len(lat),
        "5xx": sum(v for s, v in statuses.items() if s >= 500),
        "other": {str(s): v for s, v in statuses.items() if s != 200},
        "images_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
    }


def stall(port: int, key: str, body: bytes, ctype: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    head = (
        f"POST /recognize HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    s.sendall(head.encode() + body[: len(body) // 2])
    return s


def await_answer(s: socket.socket, t0: float) -> tuple[str, float, float]:
    """(status line, seconds to the answer's first bytes, seconds to the server's close) of a stalled upload."""
    data = s.recv(4096)
    first = time.perf_counter() - t0
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    return data.split(b"\r\n", 1)[0].decode(errors="replace"), first, time.perf_counter() - t0


def serve_cmd(
    args: argparse.Namespace, ckpt: str, port: int, keys: Path, audit: Path, fault: bool
) -> list[str]:
    limits = {"max_batch_size": args.max_batch_size, "batch_timeout": args.batch_timeout,
              "body_timeout": args.body_timeout, "graceful_timeout": 30}  # fmt: skip
    common = ["--ckpt_path", ckpt, "--port", str(port), "--api_keys", str(keys), "--audit.path", str(audit),
              "--limits", json.dumps(limits)]  # fmt: skip
    if fault:
        return [sys.executable, "-m", "benchmarks.serve_production", "--fault_server", *common]
    return [sys.executable, "-m", "idrecog.cli", "serve", *common]


def fault_server(argv: list[str]) -> None:
    """``idrecog serve``'s setup, with a recognizer whose model raises on any batch holding ``FAULT_ID``."""
    p = argparse.ArgumentParser()
    for name in ("--ckpt_path", "--port", "--api_keys", "--audit.path", "--limits"):
        p.add_argument(name)
    a = p.parse_args(argv)
    from idrecog.recognition.audit import AuditLog, AuditSettings
    from idrecog.recognition.auth import ApiKeyStore
    from idrecog.recognition.recognizer import Recognizer
    from idrecog.recognition.rules import default_rules_path
    from idrecog.recognition.serve import ServeLimits, serve

    limits = ServeLimits(**json.loads(a.limits))
    rec = Recognizer.from_checkpoint(
        a.ckpt_path, rules=default_rules_path(), batch_size=limits.max_batch_size
    )
    inner = rec.recognize_batch

    def faulty(requests: list[Any]) -> list[dict[str, Any]]:
        if any(r.id == FAULT_ID for r in requests):
            raise RuntimeError("injected fault")
        return inner(requests)

    rec.recognize_batch = faulty  # type: ignore[method-assign]
    audit = AuditLog(AuditSettings(path=getattr(a, "audit.path")), rec.provenance())
    serve(rec, port=int(a.port), limits=limits, keys=ApiKeyStore(path=a.api_keys), audit=audit)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--fault_server"]:
        fault_server(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="length of each load phase")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--stalled", type=int, default=8, help="connections that stall mid-upload")
    p.add_argument("--model", choices=["tiny", "default"], default="tiny")
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--batch_timeout", type=float, default=0.01)
    p.add_argument("--body_timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    from idrecog.recognition.auth import add_key

    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    ckpt = args.ckpt_path or str(make_checkpoint(args.model, root / f"{args.model}.ckpt"))
    keys = root / "keys.txt"
    key = add_key(keys, "bench")
    bodies = _bodies()
    report: dict[str, Any] = {
        "model": args.model if args.ckpt_path is None else ckpt,
        "seconds": args.seconds,
    }
    audit = root / "audit.jsonl"
    port = _free_port()
    server = Server(serve_cmd(args, ckpt, port, keys, audit, fault=False), port, root / "server.log")
    try:
        one_request(port, key, *bodies[0])  # warm-up past /ready's single image
        report["rss_mib_start"] = round(_rss_mib(server.proc.pid), 1)
        # 1. load
        report["load"] = []
        for n in args.clients:
            rss0 = _rss_mib(server.proc.pid)
            b0, r0 = (
                _metric(port, key, "idrecog_batch_size_count"),
                _metric(port, key, "idrecog_batch_size_sum"),
            )
            results, wall = run_clients(port, key, bodies, n, args.seconds)
            b1, r1 = (
                _metric(port, key, "idrecog_batch_size_count"),
                _metric(port, key, "idrecog_batch_size_sum"),
            )
            row = {"clients": n, **summarise(results, wall)}
            row["mean_batch"] = round((r1 - r0) / (b1 - b0), 2) if b1 > b0 else 0.0
            row["rss_mib"] = [round(rss0, 1), round(_rss_mib(server.proc.pid), 1)]
            report["load"].append(row)
            print(json.dumps(row), flush=True)
        # 2. slow clients
        t0 = time.perf_counter()
        stalled = [stall(port, key, *bodies[i % len(bodies)]) for i in range(args.stalled)]
        results, wall = run_clients(port, key, bodies, 8, min(args.seconds, args.body_timeout * 0.8))
        answers = [await_answer(s, t0) for s in stalled]
        report["slow_clients"] = {
            "stalled": args.stalled,
            "body_timeout_s": args.body_timeout,
            "stalled_answers": dict(Counter(a[0] for a in answers)),
            "stalled_answered_after_s": [
                round(min(a[1] for a in answers), 2),
                round(max(a[1] for a in answers), 2),
            ],
            "stalled_closed_after_s": round(max(a[2] for a in answers), 2),
            "others_while_stalled": {"clients": 8, **summarise(results, wall)},
        }
        print(json.dumps(report["slow_clients"]), flush=True)
        report["rss_mib_end"] = round(_rss_mib(server.proc.pid), 1)
        # 3. SIGTERM during load
        lines_before = len(audit.read_text().splitlines())
        box: dict[str, Any] = {}

        def load_until_refused() -> None:
            box["results"], box["wall"] = run_clients(
                port, key, bodies, 16, args.seconds * 4, stop_on_refused=True
            )

        loader = threading.Thread(target=load_until_refused)
        loader.start()
        time.sleep(args.seconds / 2)  # let the load build up
        t_sig = time.perf_counter()
        rc = server.stop(signal.SIGTERM)
        exit_s = time.perf_counter() - t_sig
        loader.join()
        outcomes = Counter((r[0], r[1]) for r in box["results"])
        accepted = len(audit.read_text().splitlines()) - lines_before
        report["sigterm"] = {
            "clients": 16,
            "answered_200": outcomes[("answered", 200)],
            "answered_other": {
                f"{o}:{s}": v for (o, s), v in outcomes.items() if o == "answered" and s != 200
            },
            "refused_at_connect": outcomes[("refused", 0)],
            # connections closed without an answer; accepted == answered_200 shows the server had read none
            "reset_without_answer": outcomes[("lost", 0)],
            "accepted_by_server": accepted,
            "exit_status": rc,
            "seconds_from_signal_to_exit": round(exit_s, 2),
        }
        print(json.dumps(report["sigterm"]), flush=True)
    finally:
        server.stop(signal.SIGKILL)
    # 4. model fault in one request
    fport = _free_port()
    faudit = root / "fault_audit.jsonl"
    fserver = Server(serve_cmd(args, ckpt, fport, keys, faudit, fault=True), fport, root / "fault_server.log")
    try:
        fbody = multipart_body([("image", "a.jpg", _jpeg())], {"doc_type": "ald_id_card", "id": FAULT_ID})
        results, wall = run_clients(fport, key, bodies, 8, args.seconds, special=(3, *fbody))
        errors = [r for r in results if r[1] >= 500]
        report["fault"] = {
            "clients": 8,
            "requests": len(results),
            "5xx": len(errors),
            "5xx_detail": [r[3]["detail"] if r[3] else None for r in errors],
            "5xx_named_its_request": all(r[3] and r[3]["request_id"] in r[3]["detail"] for r in errors),
            "other_non_200": sum(1 for r in results if r[1] not in (200,) and r[1] < 500),
            "after_fault_ok": one_request(fport, key, *bodies[1])[1] == 200,
            "audit_error_lines": sum(
                json.loads(x)["outcome"] == "error" for x in faudit.read_text().splitlines()
            ),
        }
        print(json.dumps(report["fault"]), flush=True)
    finally:
        fserver.stop(signal.SIGTERM)
    print(json.dumps(report, indent=1))
    tmp.cleanup()
    return 0


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (512, 320), (90, 120, 150)).save(buf, "JPEG")
    return buf.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
