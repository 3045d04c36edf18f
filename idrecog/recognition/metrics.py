"""Prometheus metrics of ``idrecog serve`` (``GET /metrics``), in a registry per app so that several apps in
one process (tests) do not share counters."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# endpoints named in labels; anything else is "other" so that scanners cannot grow the label set
ENDPOINTS = ("/recognize", "/health", "/ready", "/metrics", "/stats", "/info", "/docs", "/openapi.json")


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "idrecog_http_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "idrecog_recognize_seconds",
            "POST /recognize: seconds from the request's arrival to its answer (any status)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.batch_size = Histogram(
            "idrecog_batch_size",
            "requests per forward pass",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.model_seconds = Histogram(
            "idrecog_batch_model_seconds",
            "seconds of one forward pass (batch) in the model thread",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.queue_depth = Gauge("idrecog_queue_depth", "requests waiting for the model", registry=r)
        self.in_flight = Gauge("idrecog_requests_in_flight", "HTTP requests being handled", registry=r)
        self.refusals = Counter(
            "idrecog_refusals", "requests refused before the model, by reason", ["reason"], registry=r
        )
        self.decisions = Counter(
            "idrecog_decisions", "recognitions answered, by decision", ["decision"], registry=r
        )
        self.errors = Counter(
            "idrecog_recognition_errors", "requests whose recognition failed in the model (5xx)", registry=r
        )
        self.active = 0  # the in-flight gauge's value, readable without prometheus_client internals
        self.ready = Gauge(
            "idrecog_ready", "1 when the model is loaded and warm and not draining", registry=r
        )

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def endpoint(self, path: str) -> str:
        return path if path in ENDPOINTS else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
