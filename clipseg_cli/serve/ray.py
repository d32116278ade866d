"""``clipseg serve --engine ray``: the same app as a Ray Serve deployment.

Each replica is a Ray actor holding the model once (:class:`~clipseg_cli.serve.service.Service`,
opened as a run opens it) behind the same FastAPI app (``@serve.ingress``, built in the replica),
with Ray Serve's ``@serve.batch`` gathering concurrent requests into model calls in place of the
local batcher; both call :meth:`Service.predict`, so the answers are the same bytes. Ray Serve's
HTTP proxy listens on ``--host``/``--port`` and spreads requests over the replicas
(``--replicas N``, or autoscaling from one replica on the requests in flight).

Ray is imported only here; see docs/serve.md for clusters.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Callable
from types import ModuleType

from clipseg_cli.run.items import Prediction
from clipseg_cli.serve.app import create_app
from clipseg_cli.serve.guard import log_to_stderr
from clipseg_cli.serve.metrics import Metrics
from clipseg_cli.serve.service import DEFAULT_MAX_BATCH, Job, ServeSettings, Service

INSTALL_HINT = "pip install 'clipseg-cli[ray]'"
APP_NAME = "clipseg"
#: Autoscaling without --replicas: between 1 and this many replicas, aiming at this many
#: requests in flight per replica.
MAX_REPLICAS = 8
TARGET_ONGOING = 4

#: This replica's serving and metrics (each replica is its own process).
_REPLICA: dict = {}


def require_ray_serve() -> ModuleType:
    """Ray with Ray Serve, or a usage error (ValueError) saying how to install it."""
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise ValueError(
            f"--engine ray needs Ray Serve, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


def _metrics() -> Metrics:
    return _REPLICA.setdefault("metrics", Metrics())


class RayServing:
    """A replica's service, and its ``@serve.batch`` method as the way to the model."""

    def __init__(self, service: Service, batched: Callable) -> None:
        self.service = service
        self._batched = batched

    async def predict(self, job: Job) -> Prediction:
        return await self._batched(job)


def deployment(settings: ServeSettings, replicas: int | None, gpus: float = 0.0):
    """The Ray Serve deployment class of these settings; ``gpus`` per replica."""
    from ray import serve

    def build_app():
        return create_app(settings, lambda: _REPLICA.get("serving"), metrics=_metrics())

    limits = settings.limits
    options: dict = {
        # Our admission answers 503 + Retry-After in JSON before Ray's own bound is reached.
        "max_ongoing_requests": 2 * limits.max_queue,
        "max_queued_requests": limits.max_queue,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": gpus},
    }
    if replicas is not None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": MAX_REPLICAS,
            "target_ongoing_requests": TARGET_ONGOING,
        }

    @serve.deployment(name="clipseg", **options)
    @serve.ingress(build_app)
    class ClipsegReplica:
        def __init__(self) -> None:
            log_to_stderr()  # the request log, as Ray forwards a replica's stderr
            self.service = Service(settings, on_batch=_metrics().batch)
            _REPLICA["serving"] = RayServing(self.service, self.predict)

        @serve.batch(
            max_batch_size=settings.max_batch or DEFAULT_MAX_BATCH,
            batch_wait_timeout_s=settings.max_wait_ms / 1000,
        )
        async def predict(self, jobs: list[Job]) -> list[Prediction]:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.service.model_thread, self.service.predict, jobs)

    return ClipsegReplica


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run(
    settings: ServeSettings,
    host: str,
    port: int,
    replicas: int | None,
    on_listening: Callable[[str], None],
    on_notice: Callable[[str], None],
) -> None:
    """Start (or join, ``--ray-address``) Ray, deploy, serve until SIGINT or SIGTERM.

    Raises:
        ValueError: Ray Serve is not installed.
    """
    ray = require_ray_serve()
    from ray import serve

    from clipseg_cli.weights import identify

    # Here first: a model that is not there (or not cached, offline) is one line, exit 4,
    # before a cluster is started or joined.
    identify(settings.base.model, settings.base.clip_weights)
    address = settings.base.ray_address
    ray.init(address=address, include_dashboard=False, configure_logging=False)
    try:
        port = port or _free_port(host)
        serve.start(http_options={"host": host, "port": port})
        on_notice(f"deploying on Ray Serve ({'a local Ray' if address is None else address})")
        # One GPU per replica where the cluster has GPUs (then --device auto picks it there).
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        app = deployment(settings, replicas, gpus).bind()
        serve.run(app, name=APP_NAME, route_prefix="/")
        shown = f"[{host}]" if ":" in host else host
        on_listening(f"http://{shown}:{port}/")
        _wait_for_a_stop_signal()
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_for_a_stop_signal() -> None:
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_args: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
