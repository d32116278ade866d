"""The door every request goes through (an ASGI middleware), before any route sees it:

- the token (``Authorization: Bearer``), checked before a byte of the body is read (401);
- the body, counted while it streams in (413 at ``--max-body``, whatever ``Content-Length``
  says; a declared length over it is refused at once), and the time it may take to arrive
  (408 at ``--read-timeout``: a slow client holds a connection, never the server);
- every error as JSON ``{"error", "detail"}``, never a traceback; an answer sent before the body
  was read whole closes the connection, so the rest of the body is never read;
- one JSON log line per request (time, id, route, status, bytes, seconds, batch size; never
  image data), and the request metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

from clipseg_cli.serve.limits import ServeLimits
from clipseg_cli.serve.metrics import Metrics, route_of
from clipseg_cli.serve.problems import ApiError, exceeded

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The request log's logger: one JSON object per line (:func:`log_to_stderr`).
REQUEST_LOG = logging.getLogger("clipseg.serve.requests")
#: Paths anyone may open: the page, health, and the API's description.
PUBLIC = ("/", "/healthz", "/readyz", "/docs", "/openapi.json", "/favicon.ico")
PUBLIC_PREFIXES = ("/page/",)
#: Status of a request whose client left before its answer (nginx's convention; never sent).
CLIENT_GONE = 499
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class _Exchange:
    """One request's bookkeeping: its id, clock, bytes, status."""

    def __init__(self, scope: Scope, read_timeout: float) -> None:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        self.headers = headers
        self.id = secrets.token_hex(6)
        self.started = time.perf_counter()
        self.read_deadline = asyncio.get_running_loop().time() + read_timeout
        self.route = route_of(scope.get("path", ""))
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self.declared = _int(headers.get(b"content-length"))
        self.body_done = not chunked and not self.declared
        self.bytes_in = 0
        self.bytes_out = 0
        self.status: int | None = None
        self.error: str | None = None
        self.trace: str | None = None


def _int(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class Guard:
    """The middleware (see the module docstring).

    Args:
        app: the routes.
        token: the Bearer token every non-public route needs; None: no authentication
            (``--no-auth``, or a server on 127.0.0.1 without a token).
        limits: the body and time limits.
        metrics: where requests are counted.
    """

    def __init__(self, app, *, token: str | None, limits: ServeLimits, metrics: Metrics) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.limits = limits
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(scope, self.limits.read_timeout)
        state = scope.setdefault("state", {})
        state["request_id"] = exchange.id
        send = self._sending(exchange, send)
        try:
            self._check_door(scope, exchange)
            await self.app(scope, self._receiving(exchange, receive), send)
        except ApiError as error:
            await self._refuse(exchange, send, error)
        except ClientDisconnect:
            exchange.status = CLIENT_GONE
            exchange.error = "the client left"
        except Exception as error:  # a bug: the client gets JSON and the id, the log the trace
            exchange.trace = "".join(traceback.format_exception(error))
            await self._refuse(
                exchange,
                send,
                ApiError(
                    500,
                    "internal error",
                    f"request {exchange.id} failed; the server log has the details",
                ),
            )
        finally:
            self._record(scope, exchange, state)

    def _check_door(self, scope: Scope, exchange: _Exchange) -> None:
        """401 and 413 from the headers alone: nothing of the body is read."""
        path = scope.get("path", "")
        public = path in PUBLIC or path.startswith(PUBLIC_PREFIXES)
        if self.token is not None and not public and scope.get("method") != "OPTIONS":
            given = exchange.headers.get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                raise ApiError(
                    401,
                    "unauthorized",
                    "send the server's token as 'Authorization: Bearer TOKEN'",
                    {"WWW-Authenticate": 'Bearer realm="clipseg"'},
                )
        if exchange.declared is not None and exchange.declared > self.limits.max_body:
            raise exceeded(
                "max_body",
                f"Content-Length {exchange.declared} is over {self.limits.max_body} bytes",
            )

    def _receiving(self, exchange: _Exchange, receive: Receive) -> Receive:
        """``receive`` with the body counted and timed."""

        async def guarded() -> Message:
            if exchange.body_done:
                return await receive()  # after the body: only a disconnect can come
            loop = asyncio.get_running_loop()
            left = exchange.read_deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                raise exceeded(
                    "read_timeout",
                    f"the body did not arrive within {self.limits.read_timeout:g} s",
                ) from None
            if message["type"] == "http.request":
                exchange.bytes_in += len(message.get("body", b""))
                if exchange.bytes_in > self.limits.max_body:
                    raise exceeded("max_body", f"the body is over {self.limits.max_body} bytes")
                exchange.body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                exchange.body_done = True
            return message

        return guarded

    def _sending(self, exchange: _Exchange, send: Send) -> Send:
        """``send`` with the common headers added and the answer counted."""

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                headers = [*message.get("headers", []), *_SECURITY_HEADERS]
                headers.append((b"x-request-id", exchange.id.encode()))
                if not exchange.body_done:
                    # Answered before the body was read whole: close, never read the rest.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                exchange.bytes_out += len(message.get("body", b""))
            await send(message)

        return tracked

    async def _refuse(self, exchange: _Exchange, send: Send, error: ApiError) -> None:
        exchange.error = f"{error.error}: {error.detail}"
        if exchange.status is not None:
            return  # the answer had started: nothing more can be said
        body = error.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, exchange: _Exchange, state: dict) -> None:
        status = exchange.status or CLIENT_GONE
        seconds = time.perf_counter() - exchange.started
        self.metrics.requests.labels(exchange.route, str(status)).inc()
        self.metrics.latency.labels(exchange.route).observe(seconds)
        if status >= 400:
            self.metrics.refused.labels(str(status)).inc()
        client = scope.get("client")
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "id": exchange.id,
            "method": scope.get("method"),
            "route": exchange.route,
            "status": status,
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "seconds": round(seconds, 4),
            "batch_size": state.get("batch_size"),
            "client": client[0] if client else None,
        }
        error = exchange.error or state.get("error")
        if error is not None:
            line["error"] = error
        if exchange.trace is not None:
            line["traceback"] = exchange.trace
        REQUEST_LOG.info(json.dumps(line))


def log_to_stderr() -> None:
    """The request log (and the server's own messages): one line each, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("clipseg.serve")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
