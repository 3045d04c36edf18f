"""``idrecog serve``: the recognizer behind HTTP, with dynamic batching and request limits.

Endpoints:

* ``POST /recognize`` (multipart/form-data): ``image`` (file, required), ``flash`` (file), ``angles`` (files,
  repeated), ``user`` (JSON text), ``doc_type`` (text), ``id`` (text). Answers the recognize JSON object.
* ``GET /health``: ``{"status": "ok", "tasks": [...], ...}``.
* ``GET /stats``: requests, batches, mean batch size, seconds inside the model.

Built on FastAPI + uvicorn rather than LitServe: LitServe 0.2.19 decodes requests inside its batched worker
loop (``litserve/loops/simple_loops.py``, ``BatchedLoop``), where one request whose ``decode_request`` raises
fails every request of its batch, so one decompression-bomb upload would turn the good requests batched with it
into errors. Here every limit is checked in the HTTP handler, per request and before batching (bad requests
never reach the model), and the batcher (:class:`DynamicBatcher`) only sees valid inputs.

Limits (:class:`ServeLimits`), each answered with a 4xx and a one-line ``detail``: request without
``Content-Length`` (411), request or file over the byte limit (413), image over the pixel limit, i.e. a
decompression bomb (413), not an image or a type not allowed (415), malformed form, JSON or doc type (400/422),
too many requests queued (503).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from idrecog.recognition.recognizer import RecognitionRequest

T = TypeVar("T")
R = TypeVar("R")

_FORM_FIELDS = {"image", "flash", "angles", "user", "doc_type", "id"}


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


class RequestError(Exception):
    """A request the server refuses: an HTTP status (4xx) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
        raise RequestError(413, f"field '{field}': image too large (decompression bomb?): {e}") from None
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
        )
    w, h = im.size
    if w * h > limits.max_pixels:
        raise RequestError(
            413,
            f"field '{field}': image of {w}x{h} = {w * h} pixels is over the limit of {limits.max_pixels} "
            "(decompression bomb?)",
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
    """

    def __init__(
        self, fn: Callable[[list[T]], list[R]], max_batch_size: int, batch_timeout: float, max_queue: int
    ) -> None:
        self.fn = fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_timeout = float(batch_timeout)
        self.max_queue = int(max_queue)
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[tuple[R, dict[str, float]]]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idrecog-model")
        self.stats = {"requests": 0, "batches": 0, "model_seconds": 0.0}

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: T) -> tuple[R, dict[str, float]]:
        """The result for ``item`` and its timing (``model_ms`` of its batch, ``batch_size``)."""
        assert self._queue is not None, "start() the batcher first"
        if self._queue.qsize() >= self.max_queue:
            raise RequestError(503, f"server busy: {self.max_queue} requests already queued")
        fut: asyncio.Future[tuple[R, dict[str, float]]] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

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
            batch = [(x, f) for x, f in batch if not f.done()]  # clients that went away
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [x for x, _ in batch])
            except Exception as e:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            dt = time.perf_counter() - t0
            self.stats["requests"] += len(batch)
            self.stats["batches"] += 1
            self.stats["model_seconds"] += dt
            timing = {"model_ms": dt * 1000.0, "batch_size": float(len(batch))}
            for (_, f), r in zip(batch, results, strict=True):
                if not f.done():
                    f.set_result((r, timing))


def create_app(recognizer: Any, limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI app around ``recognizer`` (anything with ``catalogue`` and ``recognize_batch(requests)``)."""
    limits = limits or ServeLimits()
    batcher: DynamicBatcher[RecognitionRequest, dict[str, Any]] = DynamicBatcher(
        recognizer.recognize_batch, limits.max_batch_size, limits.batch_timeout, limits.max_queue
    )
    doc_types = set(recognizer.catalogue.doc_types or ())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="idrecog", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.limits = limits

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        info = recognizer.info() if hasattr(recognizer, "info") else {}
        return {"status": "ok", "tasks": recognizer.catalogue.names, **info}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        s = dict(batcher.stats)
        s["mean_batch_size"] = s["requests"] / s["batches"] if s["batches"] else 0.0
        return {**s, "limits": asdict(limits)}

    async def read_file(value: Any, field: str) -> Image.Image:
        if not isinstance(value, UploadFile):
            raise RequestError(400, f"field '{field}' must be a file upload")
        if value.size is not None and value.size > limits.max_upload_bytes:
            raise RequestError(
                413, f"field '{field}': {value.size} bytes, over the limit of {limits.max_upload_bytes}"
            )
        data = await value.read(limits.max_upload_bytes + 1)
        return decode_image(data, field, limits)

    def text_field(form: Any, name: str) -> str | None:
        v = form.get(name)
        if v is None:
            return None
        if not isinstance(v, str):
            raise RequestError(400, f"field '{name}' must be text, not a file")
        if len(v.encode()) > limits.max_field_bytes:
            raise RequestError(413, f"field '{name}': over the limit of {limits.max_field_bytes} bytes")
        return v

    @app.post("/recognize")
    async def recognize(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise RequestError(
                415, f"send multipart/form-data with an 'image' file, got content type {ctype!r}"
            )
        length = request.headers.get("content-length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        if not length.isdigit() or int(length) > limits.max_request_bytes:
            raise RequestError(
                413, f"request of {length} bytes is over the limit of {limits.max_request_bytes}"
            )
        try:
            form = await request.form(
                max_files=2 + limits.max_angles, max_fields=len(_FORM_FIELDS) + limits.max_angles
            )
        except Exception as e:  # malformed multipart, too many parts
            raise RequestError(400, f"malformed multipart form: {getattr(e, 'detail', e)}") from None
        try:
            unknown = sorted(set(form.keys()) - _FORM_FIELDS)
            if unknown:
                raise RequestError(400, f"unknown form field {unknown[0]!r}; expected {sorted(_FORM_FIELDS)}")
            if "image" not in form:
                raise RequestError(400, "field 'image' (the document image file) is required")
            image = await read_file(form["image"], "image")
            flash = await read_file(form["flash"], "flash") if "flash" in form else None
            angle_files = form.getlist("angles")
            if len(angle_files) > limits.max_angles:
                raise RequestError(
                    413, f"{len(angle_files)} angle frames, over the limit of {limits.max_angles}"
                )
            angles = [await read_file(a, f"angles[{i}]") for i, a in enumerate(angle_files)]
            user = None
            raw_user = text_field(form, "user")
            if raw_user:
                try:
                    user = json.loads(raw_user)
                except json.JSONDecodeError as e:
                    raise RequestError(400, f"field 'user' is not valid JSON: {e}") from None
                if not isinstance(user, dict):
                    raise RequestError(400, "field 'user' must be a JSON object {attributes, behaviour}")
            doc_type = text_field(form, "doc_type") or None
            if doc_type is not None and doc_types and doc_type not in doc_types:
                raise RequestError(
                    422, f"unknown doc_type {doc_type!r}; known: {', '.join(sorted(doc_types))}"
                )
            req = RecognitionRequest(
                image=image,
                id=text_field(form, "id") or "request",
                flash=flash,
                angles=angles,
                user=user,
                doc_type=doc_type,
            )
        finally:
            await form.close()
        result, timing = await batcher.submit(req)
        result = dict(result)
        result["timing"] = {**timing, "server_ms": (time.perf_counter() - t0) * 1000.0}
        return JSONResponse(result)

    return app


def serve(
    recognizer: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    log_level: str = "warning",
) -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(create_app(recognizer, limits), host=host, port=port, log_level=log_level)
