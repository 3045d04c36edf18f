"""Serving under load on loopback: a bounded number of requests from this process to ``idrecog serve`` in another.

    .venv/bin/python -m benchmarks.serve_load [--requests 64] [--concurrency 8] [--ckpt_path X]

Without ``--ckpt_path`` a randomly initialised default-size model (vit_tiny, 160x256) is saved to a temporary
checkpoint. Prints requests/s, p50/p99 latency, errors, the server's mean batch size and the share of request time
spent outside the model (1 - mean per-request model time / mean client latency).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import multipart_body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--batch_timeout", type=float, default=0.01)
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    ckpt = args.ckpt_path
    if ckpt is None:
        import torch

        from idrecog.lit.unified import UnifiedModule

        torch.manual_seed(0)
        m = UnifiedModule()
        ckpt = str(Path(tmp.name) / "random.ckpt")
        torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, ckpt)
    port = _free_port()
    limits = json.dumps({"max_batch_size": args.max_batch_size, "batch_timeout": args.batch_timeout})
    cmd = [
        sys.executable,
        "-m",
        "idrecog.cli",
        "serve",
        "--ckpt_path",
        ckpt,
        "--port",
        str(port),
        "--limits",
        limits,
        "--insecure",  # loopback only; benchmarks/serve_production.py measures the server with API keys
    ]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if _get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        rng = np.random.default_rng(0)
        bodies = []
        for i in range(8):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (320, 512, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            bodies.append(
                multipart_body(
                    [("image", "a.jpg", buf.getvalue())], {"doc_type": "ald_id_card", "id": str(i)}
                )
            )

        def one(i: int) -> tuple[int, float, float]:
            body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                c.request("POST", "/recognize", body=body, headers={"Content-Type": ctype})
                r = c.getresponse()
                data = r.read()
            finally:
                c.close()
            dt = time.perf_counter() - t0
            model_ms = json.loads(data)["timing"]["model_ms"] if r.status == 200 else 0.0
            return r.status, dt, model_ms / 1000.0

        one(0)  # warm-up
        _, before = _get(port, "/stats")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        _, after = _get(port, "/stats")
        b, a = json.loads(before), json.loads(after)
        lat = sorted(r[1] for r in results if r[0] == 200)
        model = [r[2] for r in results if r[0] == 200]
        batches = a["batches"] - b["batches"]
        res = {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "errors": sum(r[0] != 200 for r in results),
            "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
            "mean_batch_size": round((a["requests"] - b["requests"]) / batches, 2) if batches else 0.0,
            "share_outside_model": round(1 - statistics.mean(model) / statistics.mean(lat), 3),
        }
        print(json.dumps(res))
    finally:
        server.terminate()
        server.wait(timeout=30)
        tmp.cleanup()


if __name__ == "__main__":
    main()
