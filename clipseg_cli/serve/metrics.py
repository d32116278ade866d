"""The server's Prometheus metrics (``GET /metrics``), through ``prometheus_client``: requests by
route and status, latency, the queue's depth, batch sizes, model seconds, refusals by limit.

Each app has its own registry: several servers in one process (tests, Ray replicas sharing a
worker) never mix their counts.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: Routes by name; any other path counts as "other" (no label per client-chosen path).
ROUTES = (
    "/",
    "/page",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/segment",
    "/v1/matte",
    "/docs",
    "/openapi.json",
)


def route_of(path: str) -> str:
    """The metrics label of a request path."""
    if path.startswith("/page/"):
        return "/page"
    return path if path in ROUTES else "other"


class Metrics:
    """The server's instruments, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clipseg_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "clipseg_request_seconds",
            "Seconds from a request's arrival to its answer, by route",
            ["route"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "clipseg_queue_depth",
            "Requests admitted and not yet answered (see --max-queue)",
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "clipseg_batch_images",
            "Images per model call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=self.registry,
        )
        self.model_seconds = Counter(
            "clipseg_model_seconds",
            "Seconds spent in model calls",
            registry=self.registry,
        )
        self.refused = Counter(
            "clipseg_refused",
            "Requests refused by a limit or a check, by status",
            ["status"],
            registry=self.registry,
        )

    def batch(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.model_seconds.inc(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
