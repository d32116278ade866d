"""``clipseg serve --engine local``: the app on uvicorn, in this process.

The socket is bound first (a port in use fails before the model loads), the model is opened and
warmed, then the server listens. uvicorn's h11 protocol gets one addition: a deadline for a
request's headers (uvicorn has none), so a client that sends its headers a byte at a time is
dropped at ``--read-timeout``; the guard times the body.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from clipseg_cli.run.items import Prediction
from clipseg_cli.serve.app import create_app
from clipseg_cli.serve.batching import LocalBatcher
from clipseg_cli.serve.service import Job, ServeSettings, Service


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, dropping a connection whose next request's headers have not
    all arrived ``header_timeout`` seconds after it opened or after its last answer."""

    header_timeout = 30.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        # A new request's cycle replaces self.cycle once its headers are complete.
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire, self.cycle)

    def _expire(self, cycle: object) -> None:
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def header_deadline(seconds: float) -> type[HeaderDeadline]:
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout": seconds})


class LocalServing:
    """The service and its batcher, as the routes use them."""

    def __init__(self, service: Service, batcher: LocalBatcher) -> None:
        self.service = service
        self.batcher = batcher

    def predict(self, job: Job) -> asyncio.Future[Prediction]:
        return self.batcher.predict(job)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port).

    Raises:
        ValueError: the address cannot be used (one line).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def run(
    settings: ServeSettings,
    host: str,
    port: int,
    on_listening: Callable[[str], None],
    on_notice: Callable[[str], None],
) -> None:
    """Open the model, listen, serve until SIGINT or SIGTERM (then finish what is in flight).

    Raises:
        ValueError: the address cannot be used, or a bad option.
        WeightsError: the model cannot be loaded.
    """
    sock = bind(host, port)
    try:
        service = Service(settings, on_notice)
        holder: dict[str, LocalServing] = {}

        @asynccontextmanager
        async def lifespan(_app: FastAPI):
            batcher = LocalBatcher(service, settings.max_wait_ms)
            batcher.start()
            holder["serving"] = LocalServing(service, batcher)
            try:
                yield
            finally:
                service.ready = False
                await batcher.stop()
                service.close()

        app = create_app(settings, lambda: holder.get("serving"), lifespan)
        service.on_batch = app.state.metrics.batch
        config = uvicorn.Config(
            app,
            http=header_deadline(settings.limits.read_timeout),
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_keep_alive=5,
            server_header=False,
            timeout_graceful_shutdown=settings.limits.timeout,
        )
        on_listening(url_of(sock))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
