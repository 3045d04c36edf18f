"""The server: good requests answered, oversized / non-image / decompression-bomb uploads refused with 4xx while it
stays up, and concurrent requests batched into one forward pass."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvicorn
from PIL import Image

from benchmarks.common import multipart_body
from idrecog.recognition.recognizer import Recognizer
from idrecog.recognition.rules import default_rules_path
from idrecog.recognition.serve import ServeLimits, create_app
from tests.test_recognize import make_tiny_module

LIMITS = ServeLimits(
    max_upload_bytes=200_000, max_request_bytes=600_000, max_pixels=1_000_000, batch_timeout=0.25
)


def _png(w: int = 96, h: int = 64, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128 if mode != "RGB" else (200, 180, 160)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    rec = Recognizer(make_tiny_module(), rules=default_rules_path())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(create_app(rec, LIMITS), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data.startswith(b"{") else data)
    finally:
        c.close()


def _post(port: int, files, fields=None):
    body, ctype = multipart_body(files, fields)
    return _request(port, "POST", "/recognize", body, {"Content-Type": ctype})


def _healthy(port: int) -> bool:
    status, body = _request(port, "GET", "/health")
    return status == 200 and body["status"] == "ok"


def test_good_request_gets_the_recognize_object(server):
    user = json.dumps({"attributes": {"declared_nationality": "ALD"}})
    status, body = _post(
        server,
        [
            ("image", "a.png", _png()),
            ("flash", "f.png", _png()),
            ("angles", "a0.png", _png()),
            ("angles", "a1.png", _png()),
        ],
        {"doc_type": "ald_id_card", "user": user, "id": "doc-1"},
    )
    assert status == 200, body
    assert body["id"] == "doc-1" and body["tasks"]["how"] == "doc_type given"
    assert body["recognition"]["decision"] in ("accept", "review", "reject")
    assert set(body["routing"]) == set(body["tasks"]["resolved"])
    assert body["timing"]["model_ms"] > 0


@pytest.mark.parametrize(
    ("files", "fields", "status", "needle"),
    [
        ([("image", "a.txt", b"this is not an image")], None, 415, "not an image"),
        ([("image", "big.png", b"\x89PNG" + b"0" * 250_000)], None, 413, "over the limit"),
        # 4000 x 4000 one-bit PNG: a few kB on the wire, 16 M pixels decoded
        ([("image", "bomb.png", _png(4000, 4000, "1"))], None, 413, "decompression bomb"),
        (
            [
                (
                    "image",
                    "a.gif",
                    (lambda b: (Image.new("RGB", (8, 8)).save(b, "GIF"), b.getvalue())[1])(io.BytesIO()),
                )
            ],
            None,
            415,
            "GIF not allowed",
        ),
        ([("image", "a.png", _png())], {"doc_type": "martian_passport"}, 422, "unknown doc_type"),
        ([("image", "a.png", _png())], {"user": "{not json"}, 400, "not valid JSON"),
        ([("flash", "a.png", _png())], None, 400, "'image'"),
        ([("image", "a.png", _png()), ("colour", "b.png", _png())], None, 400, "unknown form field"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_stays_up(server, files, fields, status, needle):
    got, body = _post(server, files, fields)
    assert got == status, body
    assert needle in body["detail"]
    assert _healthy(server)


def test_oversized_request_and_wrong_content_type(server):
    status, body = _request(server, "POST", "/recognize", b"x" * 10, {"Content-Type": "application/json"})
    assert status == 415
    body, ctype = multipart_body([("image", "a.png", _png())])
    status, _ = _request(
        server,
        "POST",
        "/recognize",
        body,
        {"Content-Type": ctype, "Content-Length": str(LIMITS.max_request_bytes + 1)},
    )
    assert status == 413  # refused on the header, before reading the body
    assert _healthy(server)


def test_concurrent_requests_share_forward_passes_and_a_bad_one_spoils_none(server):
    _, before = _request(server, "GET", "/stats")
    jobs = [([("image", "a.png", _png())], {"id": f"r{i}"}) for i in range(6)]
    jobs.insert(3, ([("image", "a.txt", b"nope")], {"id": "bad"}))
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: _post(server, *j), jobs))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 6 and statuses[3] == 415
    _, after = _request(server, "GET", "/stats")
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 6
    assert batches < requests  # at least two requests shared a forward pass
    assert max(b["timing"]["batch_size"] for s, b in results if s == 200) >= 2
