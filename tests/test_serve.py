"""The server: good requests answered, oversized / non-image / decompression-bomb uploads refused with 4xx while it
stays up, concurrent requests batched into one forward pass, a model failure confined to its request, stalled
uploads timed out, /ready, /metrics and the OpenAPI description of /recognize."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PIL import Image

from benchmarks.common import multipart_body
from idrecog.recognition.audit import AuditLog, AuditSettings
from idrecog.recognition.auth import ApiKey, ApiKeyStore, hash_key, new_key
from idrecog.recognition.recognizer import Recognizer
from idrecog.recognition.rules import default_rules_path
from idrecog.recognition.schema import RecognizeResponse
from idrecog.recognition.serve import ServeLimits, create_app
from tests.test_recognize import make_tiny_module

LIMITS = ServeLimits(
    max_upload_bytes=200_000, max_request_bytes=600_000, max_pixels=1_000_000, batch_timeout=0.25
)
KEY = new_key()
REVOKED = new_key()


def png(w: int = 96, h: int = 64, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128 if mode != "RGB" else (200, 180, 160)).save(buf, "PNG")
    return buf.getvalue()


def keystore() -> ApiKeyStore:
    return ApiKeyStore([ApiKey("ops", hash_key(KEY)), ApiKey("old", hash_key(REVOKED), revoked=True)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: Any, log_level: str = "warning") -> Iterator[int]:
    """``app`` served by uvicorn in a thread on a free loopback port, until /ready; stopped on exit."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started or request(port, "GET", "/ready")[0] != 200:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not get ready"
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return Recognizer(make_tiny_module(), rules=default_rules_path())


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "decisions.jsonl"


@pytest.fixture(scope="module")
def server(recognizer: Recognizer, audit_path: Path) -> Iterator[int]:
    audit = AuditLog(AuditSettings(path=str(audit_path)), recognizer.provenance())
    with running(create_app(recognizer, LIMITS, keys=keystore(), audit=audit)) as port:
        yield port
    audit.close()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    key: str | None = None,
) -> tuple[int, Any]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = dict(headers or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data.startswith(b"{") else data)
    finally:
        c.close()


def post(port: int, files, fields=None, key: str | None = KEY) -> tuple[int, Any]:
    body, ctype = multipart_body(files, fields)
    return request(port, "POST", "/recognize", body, {"Content-Type": ctype}, key=key)


def healthy(port: int) -> bool:
    status, body = request(port, "GET", "/health")
    return status == 200 and body["status"] == "ok"


def test_good_request_gets_the_recognize_object(server):
    user = json.dumps({"attributes": {"declared_nationality": "ALD"}})
    status, body = post(
        server,
        [
            ("image", "a.png", png()),
            ("flash", "f.png", png()),
            ("angles", "a0.png", png()),
            ("angles", "a1.png", png()),
        ],
        {"doc_type": "ald_id_card", "user": user, "id": "doc-1"},
    )
    assert status == 200, body
    assert body["id"] == "doc-1" and body["tasks"]["how"] == "doc_type given"
    assert body["recognition"]["decision"] in ("accept", "review", "reject")
    assert set(body["routing"]) == set(body["tasks"]["resolved"])
    assert body["timing"]["model_ms"] > 0
    RecognizeResponse.model_validate(body)  # the documented response model describes the real answer


@pytest.mark.parametrize(
    ("files", "fields", "status", "needle"),
    [
        ([("image", "a.txt", b"this is not an image")], None, 415, "not an image"),
        ([("image", "big.png", b"\x89PNG" + b"0" * 250_000)], None, 413, "over the limit"),
        # 4000 x 4000 one-bit PNG: a few kB on the wire, 16 M pixels decoded
        ([("image", "bomb.png", png(4000, 4000, "1"))], None, 413, "decompression bomb"),
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
        ([("image", "a.png", png())], {"doc_type": "martian_passport"}, 422, "unknown doc_type"),
        ([("image", "a.png", png())], {"user": "{not json"}, 400, "not valid JSON"),
        ([("flash", "a.png", png())], None, 400, "'image'"),
        ([("image", "a.png", png()), ("colour", "b.png", png())], None, 400, "unknown form field"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_stays_up(server, files, fields, status, needle):
    got, body = post(server, files, fields)
    assert got == status, body
    assert needle in body["detail"]
    assert healthy(server)


def test_oversized_request_and_wrong_content_type(server):
    status, body = request(
        server, "POST", "/recognize", b"x" * 10, {"Content-Type": "application/json"}, key=KEY
    )
    assert status == 415
    body, ctype = multipart_body([("image", "a.png", png())])
    status, _ = request(
        server,
        "POST",
        "/recognize",
        body,
        {"Content-Type": ctype, "Content-Length": str(LIMITS.max_request_bytes + 1)},
        key=KEY,
    )
    assert status == 413  # refused on the header, before reading the body
    assert healthy(server)


def test_concurrent_requests_share_forward_passes_and_a_bad_one_spoils_none(server):
    _, before = request(server, "GET", "/stats", key=KEY)
    jobs = [([("image", "a.png", png())], {"id": f"r{i}"}) for i in range(6)]
    jobs.insert(3, ([("image", "a.txt", b"nope")], {"id": "bad"}))
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: post(server, *j), jobs))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 6 and statuses[3] == 415
    _, after = request(server, "GET", "/stats", key=KEY)
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 6
    assert batches < requests  # at least two requests shared a forward pass
    assert max(b["timing"]["batch_size"] for s, b in results if s == 200) >= 2


def _metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of the Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + (f"{{{labels}}}" if labels else "")) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if (labels or "{" not in head) and head.split("{")[0] == name:
                return float(value)
    return 0.0


def test_ready_health_and_metrics(server):
    assert request(server, "GET", "/ready") == (200, {"ready": True})
    assert request(server, "GET", "/metrics")[0] == 401  # metrics need a key, the probes do not
    _, before = request(server, "GET", "/metrics", key=KEY)
    before = before.decode()
    post(server, [("image", "bomb.png", png(4000, 4000, "1"))])
    post(server, [("image", "a.png", png())], key=None)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda i: post(server, [("image", "a.png", png())]), range(3)))
    status, after = request(server, "GET", "/metrics", key=KEY)
    after = after.decode()
    assert status == 200
    for name, labels, delta in [
        ("idrecog_refusals_total", 'reason="bomb"', 1),
        ("idrecog_refusals_total", 'reason="no_key"', 1),
        ("idrecog_recognize_seconds_count", "", 5),
        ("idrecog_http_requests_total", 'endpoint="/recognize",status="200"', 3),
        ("idrecog_http_requests_total", 'endpoint="/recognize",status="413"', 1),
    ]:
        assert _metric(after, name, labels) - _metric(before, name, labels) == delta, (name, labels)
    assert _metric(after, "idrecog_batch_size_sum") - _metric(before, "idrecog_batch_size_sum") == 3
    assert "idrecog_queue_depth 0.0" in after and "idrecog_ready 1.0" in after


def test_openapi_documents_the_recognize_form_and_answer(server):
    status, spec = request(server, "GET", "/openapi.json")
    assert status == 200
    op = spec["paths"]["/recognize"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"]
    assert set(form["properties"]) == {"image", "flash", "angles", "user", "doc_type", "id"}
    assert form["properties"]["image"]["format"] == "binary"
    assert form["properties"]["angles"]["items"]["format"] == "binary"
    assert "ald_id_card" in form["properties"]["doc_type"]["enum"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/RecognizeResponse")
    assert {"401", "403", "413", "415", "500"} <= set(op["responses"])
    assert op["security"]  # the API key schemes
    decision = spec["components"]["schemas"]["Recognition"]["properties"]["decision"]
    assert set(decision["enum"]) == {"accept", "review", "reject"}


class _FailsOn:
    """A recognizer whose model raises for any batch holding a request with id ``bad_id``."""

    def __init__(self, inner: Recognizer, bad_id: str) -> None:
        self.inner, self.bad_id = inner, bad_id
        self.catalogue, self.img_size = inner.catalogue, inner.img_size

    def provenance(self) -> dict[str, str]:
        return self.inner.provenance()

    def recognize_batch(self, requests):
        if any(r.id == self.bad_id for r in requests):
            raise RuntimeError("injected model fault")
        return self.inner.recognize_batch(requests)


def test_a_model_exception_fails_only_its_request_with_a_500_naming_it(recognizer, tmp_path):
    audit_file = tmp_path / "audit.jsonl"
    audit = AuditLog(AuditSettings(path=str(audit_file)), recognizer.provenance())
    app = create_app(_FailsOn(recognizer, "poison"), LIMITS, keys=keystore(), audit=audit)
    with running(app) as port:
        ids = ["a", "b", "poison", "c", "d"]
        with ThreadPoolExecutor(len(ids)) as pool:
            results = dict(
                zip(
                    ids,
                    pool.map(lambda i: post(port, [("image", "a.png", png())], {"id": i}), ids),
                    strict=True,
                )
            )
        _, stats = request(port, "GET", "/stats", key=KEY)
        status, body = results.pop("poison")
        assert status == 500
        assert body["request_id"] in body["detail"] and "RuntimeError" in body["detail"]
        assert all(s == 200 for s, _ in results.values()), results
        assert stats["failed_batches"] >= 1  # it was batched with others, which were rerun alone
        assert post(port, [("image", "a.png", png())], {"id": "after"})[0] == 200  # still answering
    audit.close()
    lines = [json.loads(x) for x in audit_file.read_text().splitlines()]
    errors = [x for x in lines if x["outcome"] == "error"]
    assert [x["request_id"] for x in errors] == [body["request_id"]]
    assert sum(x["outcome"] == "decision" for x in lines) == 5


def test_a_client_stalling_mid_upload_gets_408_and_others_are_served(recognizer):
    limits = ServeLimits(**{**LIMITS.__dict__, "body_timeout": 1.0, "batch_timeout": 0.0})
    with running(create_app(recognizer, limits, keys=keystore())) as port:
        body, ctype = multipart_body([("image", "a.png", png())])
        stalled = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            head = (
                f"POST /recognize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            s.sendall(head.encode() + body[: len(body) // 2])  # then nothing more
            stalled.append(s)
        t0 = time.monotonic()
        served = [post(port, [("image", "a.png", png())])[0] for _ in range(3)]
        assert served == [200, 200, 200]
        for s in stalled:
            answer = b""
            while chunk := s.recv(4096):  # the server answers, then closes the connection
                answer += chunk
            s.close()
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            assert b"not received within 1 s" in answer
        assert time.monotonic() - t0 < 20
        assert healthy(port)
