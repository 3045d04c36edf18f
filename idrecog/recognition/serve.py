"""``idrecog serve``: the recognizer behind HTTP, with API keys, dynamic batching, request limits, a decision
audit log, readiness and Prometheus metrics.

Endpoints (``docs/recognition.md``, "Serving"):

* ``POST /recognize`` (multipart/form-data, API key): ``image`` (file, required), ``flash`` (file), ``angles``
  (files, repeated), ``user`` (JSON text), ``doc_type`` (text), ``id`` (text). Answers the recognize JSON
  object with ``request_id`` and ``timing`` (:class:`~idrecog.recognition.schema.RecognizeResponse`).
* ``GET /health`` (no key): the process answers. ``GET /ready`` (no key): 200 once the model is loaded and
  warm, 503 while warming up or draining.
* ``GET /metrics`` (API key): Prometheus text. ``GET /stats``, ``GET /info`` (API key): counters, limits,
  model, rules and the provenance hashes.

Built on FastAPI + uvicorn rather than LitServe: LitServe 0.2.19 decodes requests inside its batched worker
loop (``litserve/loops/simple_loops.py``, ``BatchedLoop``), where one request whose ``decode_request`` raises
fails every request of its batch, so one decompression-bomb upload would turn the good requests batched with it
into errors. Here every limit is checked in the HTTP handler, per request and before batching (bad requests
never reach the model), and the batcher (:class:`DynamicBatcher`) only sees valid inputs; a batch that fails in
the model is rerun one request at a time, so only the request that fails gets the 500.

Limits (:class:`ServeLimits`), each answered with a 4xx and a one-line ``detail``: no or a wrong API key (401),
revoked key (403), request without ``Content-Length`` (411), body not received within ``body_timeout`` (408),
request or file over the byte limit (413), image over the pixel limit, i.e. a decompression bomb (413), not an
image or a type not allowed (415), malformed form, JSON or doc type (400/422), too many requests queued (503).

Personal data: uploads are parsed in memory (Starlette spools files over 1 MB to a temporary file on disk;
here the spool limit is the request limit), and neither images nor the ``user`` field reach a log or a file
unless :class:`~idrecog.recognition.audit.RetentionSettings` / ``AuditSettings.include_user`` say so.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import math
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from idrecog.errors import ConfigError
from idrecog.recognition.audit import AuditLog, Retention
from idrecog.recognition.auth import ApiKeyStore, AuthError
from idrecog.recognition.metrics import ServeMetrics
from idrecog.recognition.recognizer import RecognitionRequest
from idrecog.recognition.schema import ErrorResponse, RecognizeResponse, recognize_request_body

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("idrecog.serve")

_FORM_FIELDS = {"image", "flash", "angles", "user", "doc_type", "id"}
# refusal reasons (the ``reason`` label of idrecog_refusals_total) by status, where the raise names none
_REASONS = {400: "bad_request", 408: "body_timeout", 411: "no_length", 413: "too_large", 415: "not_image",
            422: "unknown_doc_type", 503: "queue_full"}  # fmt: skip


@dataclass
class ServeLimits:
    """Request limits of the server (all enforced before the model sees the request)."""

    #: bytes of one uploaded file
    max_upload_bytes: int = 8 * 1024 * 1024
    #: bytes of the whole request body (all files and fields)
    max_request_bytes: int = 32 * 1024 * 1024
    #: width x height of one image; larger is refused before decoding (decompression bombs)
    max_pixels: int = 25_000_000
    #: PIL format names accepted
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    #: angle frames per request
    max_angles: int = 8
    #: bytes of the ``user`` JSON field
    max_field_bytes: int = 64 * 1024
    #: concurrent requests into one forward pass, and how long the first waits for company (seconds)
    max_batch_size: int = 8
    batch_timeout: float = 0.01
    #: requests waiting for the model before new ones get 503
    max_queue: int = 256
    #: seconds to receive a whole request body; a client stalling mid-upload gets 408 and is disconnected
    body_timeout: float = 30.0
    #: connections and requests at once; the HTTP server answers more with 503 (bounds slow-client pile-ups)
    max_connections: int = 1024
    #: on SIGTERM: seconds allowed for in-flight requests to finish before connections are closed
    graceful_timeout: float = 30.0


class RequestError(Exception):
    """A request the server refuses: an HTTP status (4xx/503), a one-line message and a metrics reason."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or _REASONS.get(status, f"http_{status}")


def decode_image(data: bytes, field: str, limits: ServeLimits) -> Image.Image:
    """Bytes of an uploaded file -> RGB image, checking type and pixel count before decoding the pixels."""
    if not data:
        raise RequestError(400, f"field '{field}': empty file")
    if len(data) > limits.max_upload_bytes:
        raise RequestError(
            413, f"field '{field}': {len(data)} bytes, over the limit of {limits.max_upload_bytes}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(
            413, f"field '{field}': image too large (decompression bomb?): {e}", "bomb"
        ) from None
    except UnidentifiedImageError:
        raise RequestError(
            415, f"field '{field}': not an image (allowed: {', '.join(limits.allowed_formats)})"
        ) from None
    except Exception as e:  # PIL raises many types on hostile headers
        raise RequestError(400, f"field '{field}': unreadable image: {e}") from None
    if im.format not in limits.allowed_formats:
        raise RequestError(
            415,
            f"field '{field}': image type {im.format} not allowed (allowed: {', '.join(limits.allowed_formats)})",
            "type_not_allowed",
        )
    w, h = im.size
    if w * h > limits.max_pixels:
        raise RequestError(
            413,
            f"field '{field}': image of {w}x{h} = {w * h} pixels is over the limit of {limits.max_pixels} "
            "(decompression bomb?)",
            "bomb",
        )
    if w < 1 or h < 1:
        raise RequestError(400, f"field '{field}': image has no pixels")
    try:
        im.load()
        return im.convert("RGB")
    except Exception as e:
        raise RequestError(400, f"field '{field}': corrupt or truncated image: {e}") from None


class DynamicBatcher(Generic[T, R]):
    """Collects concurrent requests into batches of at most ``max_batch_size`` for ``fn(list[T]) -> list[R]``.

    The first request of a batch waits at most ``batch_timeout`` seconds for others; ``fn`` runs in one
    worker thread (one forward pass at a time), so the event loop keeps accepting and validating requests.
    When ``fn`` raises for a batch of several, each request is run alone, so that one request the model
    cannot handle fails alone. :meth:`stop` answers what is queued before stopping.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        max_batch_size: int,
        batch_timeout: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_timeout = float(batch_timeout)
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[tuple[R, dict[str, float]]]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idrecog-model")
        self.stats = {"requests": 0, "batches": 0, "model_seconds": 0.0, "failed_batches": 0}

    @property
    def depth(self) -> int:
        """Requests waiting for the model."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self, timeout: float = 30.0) -> None:
        """Answer every queued request (at most ``timeout`` seconds), then stop the worker."""
        if self._queue is not None and self.running:
            try:
                await asyncio.wait_for(self._queue.join(), timeout)
            except TimeoutError:
                log.warning("batcher: %d queued request(s) not answered within %.0f s", self.depth, timeout)
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run_direct(self, items: list[T]) -> list[R]:
        """``fn(items)`` in the model thread, outside the queue and the stats (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.fn, items)

    async def submit(self, item: T) -> tuple[R, dict[str, float]]:
        """The result for ``item`` and its timing (``model_ms`` of its batch, ``batch_size``)."""
        assert self._queue is not None, "start() the batcher first"
        if self._queue.qsize() >= self.max_queue:
            raise RequestError(503, f"server busy: {self.max_queue} requests already queued", "queue_full")
        fut: asyncio.Future[tuple[R, dict[str, float]]] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _forward(self, batch: list[tuple[T, asyncio.Future[tuple[R, dict[str, float]]]]]) -> None:
        """One forward pass; results (or the exception) go to the futures."""
        t0 = time.perf_counter()
        results = await self.run_direct([x for x, _ in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"the model returned {len(results)} results for {len(batch)} requests")
        dt = time.perf_counter() - t0
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        self.stats["model_seconds"] += dt
        if self.on_batch is not None:
            self.on_batch(len(batch), dt)
        timing = {"model_ms": dt * 1000.0, "batch_size": float(len(batch))}
        for (_, f), r in zip(batch, results, strict=True):
            if not f.done():
                f.set_result((r, timing))

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.batch_timeout
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(remaining, 0.0)))
                except TimeoutError:
                    break
            taken = len(batch)
            try:
                batch = [(x, f) for x, f in batch if not f.done()]  # clients that went away
                if not batch:
                    continue
                try:
                    await self._forward(batch)
                except Exception as e:
                    self.stats["failed_batches"] += 1
                    if len(batch) == 1:
                        if not batch[0][1].done():
                            batch[0][1].set_exception(e)
                        continue
                    # one input the model cannot handle must not fail the requests batched with it
                    for one in batch:
                        try:
                            await self._forward([one])
                        except Exception as e1:
                            if not one[1].done():
                                one[1].set_exception(e1)
            finally:
                for _ in range(taken):
                    self._queue.task_done()


class _RequestContext:
    """Pure ASGI middleware: a request id for every HTTP request (``X-Request-ID``), requests in flight, and
    the per-endpoint request counter and /recognize latency histogram."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        endpoint = self.metrics.endpoint(scope.get("path", ""))
        status = 500  # what the client gets when the app raises before answering
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        self.metrics.in_flight.inc()
        self.metrics.active += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.active -= 1
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint == "/recognize":
                self.metrics.latency.observe(time.perf_counter() - t0)


class _InMemoryMultiPartParser(MultiPartParser):
    """Starlette's multipart parser with uploads kept in memory: its default spools files over 1 MB to a
    temporary file, which would put identity images on disk. The request byte limit bounds the memory."""

    def __init__(self, *args: Any, spool_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spool_max_size = spool_bytes


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    recognizer: Any,
    limits: ServeLimits | None = None,
    *,
    keys: ApiKeyStore | None = None,
    insecure: bool = False,
    audit: AuditLog | None = None,
    retention: Retention | None = None,
    warmup: bool = True,
) -> FastAPI:
    """The FastAPI app around ``recognizer`` (anything with ``catalogue`` and ``recognize_batch(requests)``).

    ``keys``: the API keys every endpoint but /health and /ready requires; without keys, ``insecure=True``
    must say so (:func:`serve` allows that on a loopback address only). ``audit``: one line per recognition.
    ``retention``: keep uploads (default: none kept). ``warmup``: run one blank image through the model after
    start, before /ready answers 200.
    """
    limits = limits or ServeLimits()
    if keys is None and not insecure:
        raise ConfigError(
            "serve: no API keys given; pass keys (an ApiKeyStore) or insecure=True for local use"
        )
    if keys is not None and insecure:
        raise ConfigError("serve: API keys and insecure=True together; drop one")
    metrics = ServeMetrics()
    batcher: DynamicBatcher[RecognitionRequest, dict[str, Any]] = DynamicBatcher(
        recognizer.recognize_batch,
        limits.max_batch_size,
        limits.batch_timeout,
        limits.max_queue,
        on_batch=lambda n, dt: (metrics.batch_size.observe(n), metrics.model_seconds.observe(dt)),
    )
    metrics.track_queue(lambda: batcher.depth)
    doc_types = sorted(recognizer.catalogue.doc_types or ())
    provenance = recognizer.provenance() if hasattr(recognizer, "provenance") else {}
    img_size = tuple(getattr(recognizer, "img_size", (64, 64)))
    background: list[asyncio.Task[Any]] = []

    async def warm() -> None:
        try:
            blank = Image.new("RGB", (int(img_size[1]), int(img_size[0])), (128, 128, 128))
            await batcher.run_direct([RecognitionRequest(image=blank, id="warm-up")])
        except Exception as e:  # stays not ready; /ready says why
            app.state.not_ready = f"warm-up failed: {type(e).__name__}: {e}"
            log.exception("warm-up failed")
            return
        app.state.not_ready = None
        metrics.ready.set(1)

    async def purge_every_hour(ret: Retention) -> None:
        while True:
            removed = await asyncio.to_thread(ret.purge)
            if removed:
                log.info(
                    "retention: deleted %d kept request folder(s) older than %s days",
                    removed,
                    ret.settings.days,
                )
            await asyncio.sleep(3600)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        if warmup:
            background.append(asyncio.create_task(warm()))
        else:
            app.state.not_ready = None
            metrics.ready.set(1)
        if retention is not None:
            background.append(asyncio.create_task(purge_every_hour(retention)))
        yield
        app.state.not_ready = "draining"
        metrics.ready.set(0)
        await batcher.stop(limits.graceful_timeout)
        for task in background:
            task.cancel()

    app = FastAPI(
        title="idrecog",
        summary="Identity-document recognition: one unified multi-task model and decision rules.",
        lifespan=lifespan,
    )
    app.add_middleware(_RequestContext, metrics=metrics)
    app.state.batcher = batcher
    app.state.limits = limits
    app.state.metrics = metrics
    app.state.not_ready = "warming up"

    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")
    bearer = HTTPBearer(auto_error=False, description="an API key as a bearer token")

    async def authenticate(
        request: Request,
        x_api_key: str | None = Security(api_key_header),
        auth: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> str | None:
        """The id of the request's API key (None when the server runs insecure)."""
        if keys is None:
            return None
        key = keys.check(auth.credentials if auth is not None else x_api_key)
        request.state.key_id = key.id
        return key.id

    def refuse(request: Request, status: int, message: str, reason: str) -> JSONResponse:
        metrics.refusals.labels(reason).inc()
        rid = getattr(request.state, "request_id", None)
        log.info("request %s refused: %d %s", rid, status, reason)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if status in (408, 413):
            # the rest of the body is unwanted (or never coming): close rather than wait for it to drain
            headers["Connection"] = "close"
        return JSONResponse({"detail": message, "request_id": rid}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return refuse(request, exc.status, exc.message, exc.reason)

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, exc: AuthError) -> JSONResponse:
        return refuse(request, exc.status, exc.message, exc.reason)

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        summary="Readiness: model loaded and warm, not draining (503 otherwise)",
        responses={503: {"description": "warming up, warm-up failed, or draining"}},
    )
    async def ready() -> JSONResponse:
        why = app.state.not_ready or (None if batcher.running else "batcher stopped")
        if why is None:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "why": why}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(authenticate)])
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/info", summary="Model, rules and their hashes", dependencies=[Depends(authenticate)])
    async def info() -> dict[str, Any]:
        details = recognizer.info() if hasattr(recognizer, "info") else {}
        return {
            "tasks": recognizer.catalogue.names,
            "doc_types": doc_types,
            "provenance": provenance,
            **details,
        }

    @app.get("/stats", summary="Batching counters and limits", dependencies=[Depends(authenticate)])
    async def stats() -> dict[str, Any]:
        s = dict(batcher.stats)
        s["mean_batch_size"] = s["requests"] / s["batches"] if s["batches"] else 0.0
        s["queue_depth"] = batcher.depth
        return {**s, "limits": asdict(limits)}

    async def read_file(value: Any, field: str) -> tuple[bytes, Image.Image]:
        if not isinstance(value, UploadFile):
            raise RequestError(400, f"field '{field}' must be a file upload")
        if value.size is not None and value.size > limits.max_upload_bytes:
            raise RequestError(
                413, f"field '{field}': {value.size} bytes, over the limit of {limits.max_upload_bytes}"
            )
        data = await value.read(limits.max_upload_bytes + 1)
        return data, decode_image(data, field, limits)

    def text_field(form: FormData, name: str) -> str | None:
        v = form.get(name)
        if v is None:
            return None
        if not isinstance(v, str):
            raise RequestError(400, f"field '{name}' must be text, not a file")
        if len(v.encode("utf-8", "surrogatepass")) > limits.max_field_bytes:
            raise RequestError(413, f"field '{name}': over the limit of {limits.max_field_bytes} bytes")
        return v

    async def read_form(request: Request) -> FormData:
        parser = _InMemoryMultiPartParser(
            request.headers,
            request.stream(),
            max_files=2 + limits.max_angles,
            max_fields=len(_FORM_FIELDS) + limits.max_angles,
            max_part_size=max(limits.max_field_bytes + 1, 1024 * 1024),
            spool_bytes=limits.max_request_bytes + 1,
        )
        try:
            return await asyncio.wait_for(parser.parse(), limits.body_timeout)
        except TimeoutError:
            raise RequestError(
                408, f"request body not received within {limits.body_timeout:g} s", "body_timeout"
            ) from None
        except ClientDisconnect:
            raise RequestError(400, "client disconnected during the upload", "client_disconnect") from None
        except Exception as e:  # malformed multipart, too many parts
            raise RequestError(
                400, f"malformed multipart form: {getattr(e, 'message', e)}", "bad_form"
            ) from None

    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": desc}
        for code, desc in [
            (400, "malformed form, JSON, image or unknown field"),
            (401, "no API key, or an unknown one"),
            (403, "revoked API key"),
            (408, "body not received within body_timeout"),
            (411, "no Content-Length"),
            (413, "request, file or image over a limit"),
            (415, "not multipart/form-data, not an image, or an image type not allowed"),
            (422, "unknown doc_type"),
            (500, "recognition failed in the model for this request (named by request_id)"),
            (503, "queue full"),
        ]
    }

    @app.post(
        "/recognize",
        summary="Recognise one identity document",
        response_model=RecognizeResponse,
        responses=error_responses,
        openapi_extra=recognize_request_body(doc_types, limits.max_angles, limits.max_field_bytes),
    )
    async def recognize(request: Request, key_id: str | None = Depends(authenticate)) -> JSONResponse:
        t0 = time.perf_counter()
        rid: str = request.state.request_id
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise RequestError(
                415,
                f"send multipart/form-data with an 'image' file, got content type {ctype[:100]!r}",
                "bad_type",
            )
        length = request.headers.get("content-length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        if not length.isdigit() or int(length) > limits.max_request_bytes:
            raise RequestError(
                413, f"request of {length[:30]} bytes is over the limit of {limits.max_request_bytes}"
            )
        form = await read_form(request)
        try:
            unknown = sorted(set(form.keys()) - _FORM_FIELDS)
            if unknown:
                raise RequestError(
                    400,
                    f"unknown form field {unknown[0][:100]!r}; expected {sorted(_FORM_FIELDS)}",
                    "bad_form",
                )
            if "image" not in form:
                raise RequestError(400, "field 'image' (the document image file) is required", "bad_form")
            uploads: list[tuple[str, bytes]] = []
            raw, image = await read_file(form["image"], "image")
            uploads.append(("image", raw))
            flash = None
            if "flash" in form:
                raw, flash = await read_file(form["flash"], "flash")
                uploads.append(("flash", raw))
            angle_files = form.getlist("angles")
            if len(angle_files) > limits.max_angles:
                raise RequestError(
                    413, f"{len(angle_files)} angle frames, over the limit of {limits.max_angles}"
                )
            angles = []
            for i, a in enumerate(angle_files):
                raw, im = await read_file(a, f"angles[{i}]")
                uploads.append((f"angle{i}", raw))
                angles.append(im)
            user = None
            raw_user = text_field(form, "user")
            if raw_user:
                try:
                    user = json.loads(raw_user)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise RequestError(400, f"field 'user' is not valid JSON: {e}", "bad_json") from None
                if not isinstance(user, dict):
                    raise RequestError(
                        400, "field 'user' must be a JSON object {attributes, behaviour}", "bad_json"
                    )
            doc_type = text_field(form, "doc_type") or None
            if doc_type is not None and doc_types and doc_type not in doc_types:
                raise RequestError(422, f"unknown doc_type {doc_type[:100]!r}; known: {', '.join(doc_types)}")
            client_id = text_field(form, "id") or None
            req = RecognitionRequest(
                image=image, id=client_id or rid, flash=flash, angles=angles, user=user, doc_type=doc_type
            )
        finally:
            await form.close()
        if retention is not None:
            await asyncio.to_thread(retention.keep, rid, _with_suffixes(uploads), user)
        try:
            result, timing = await batcher.submit(req)
        except RequestError:
            raise
        except Exception as e:
            metrics.errors.inc()
            # the traceback goes to the server log under the request id; the client learns which request failed
            log.error("request %s: recognition failed", rid, exc_info=e)
            if audit is not None:
                audit.write(
                    request_id=rid, key_id=key_id, outcome="error", error=type(e).__name__,
                    client_id=client_id, user=user,
                )  # fmt: skip
            return JSONResponse(
                {
                    "detail": f"request {rid}: recognition failed in the model ({type(e).__name__}); "
                    "the server log has the details under this request id",
                    "request_id": rid,
                },
                status_code=500,
            )
        record = dict(result)
        decision = (record.get("recognition") or {}).get("decision") or "none"
        metrics.decisions.labels(decision).inc()
        if audit is not None:
            try:
                audit.write(
                    request_id=rid,
                    key_id=key_id,
                    outcome="decision",
                    record=record,
                    client_id=client_id,
                    user=user,
                )
            except Exception as e:  # fail closed: no decision leaves the server without its audit line
                log.error("request %s: the audit line could not be written", rid, exc_info=e)
                metrics.errors.inc()
                return JSONResponse(
                    {
                        "detail": f"request {rid}: the decision could not be written to the audit log",
                        "request_id": rid,
                    },
                    status_code=500,
                )
        body = {"request_id": rid, **record}
        body["timing"] = {**timing, "server_ms": (time.perf_counter() - t0) * 1000.0}
        return JSONResponse(body)

    return app


def _with_suffixes(uploads: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Kept uploads get the extension of their content (the client's file name is never used as a path)."""
    ext = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"RIFF": ".webp"}
    out = []
    for name, data in uploads:
        suffix = next((e for magic, e in ext.items() if data.startswith(magic)), ".bin")
        out.append((name + suffix, data))
    return out


def serve(
    recognizer: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    log_level: str = "warning",
    *,
    keys: ApiKeyStore | None = None,
    insecure: bool = False,
    audit: AuditLog | None = None,
    retention: Retention | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM (blocking); on either it stops accepting connections, finishes the
    requests in flight (at most ``limits.graceful_timeout`` s) and answers what is queued, then exits."""
    limits = limits or ServeLimits()
    if keys is None and not (insecure and is_loopback(host)):
        raise ConfigError(
            f"--host {host}: API keys are required (--api_keys FILE or IDRECOG_API_KEYS); "
            "--insecure (no keys) is allowed on a loopback address only"
        )
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(log_level.upper())
    app = create_app(recognizer, limits, keys=keys, insecure=insecure, audit=audit, retention=retention)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=limits.max_connections,
        timeout_graceful_shutdown=max(1, math.ceil(limits.graceful_timeout)),
        server_header=False,
    )
    server = _DrainingServer(config, on_exit=lambda: _mark_draining(app))
    server.run()


def _mark_draining(app: FastAPI) -> None:
    app.state.not_ready = "draining"
    app.state.metrics.ready.set(0)
    log.warning(
        "stop signal: finishing %d request(s) in flight, accepting no new ones", app.state.metrics.active
    )


class _DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the app not ready (/ready 503) as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)
