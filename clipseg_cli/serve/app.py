"""The HTTP API and the page: one FastAPI app, the same for ``--engine local`` and Ray Serve.

| route | what |
|---|---|
| ``POST /v1/segment`` | masks (and soft maps, overlays, cutouts, labels, instances) of one image |
| ``POST /v1/matte`` | mattes, cutouts, composites of one image |
| ``GET /healthz`` | alive |
| ``GET /readyz`` | model loaded and warmed (503 until then, and while stopping) |
| ``GET /metrics`` | Prometheus metrics |
| ``GET /`` | the page (``page/``: static package files) |
| ``GET /docs`` | the OpenAPI docs |

A model route: admitted or refused at once (``--max-queue``), its form read (the guard counts and
times the body), checked (:mod:`.request`), then prepared, predicted and answered by the
:class:`~clipseg_cli.serve.service.Service` while the client is watched: a client that leaves,
or a deadline that passes, cancels the request's work that has not started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from clipseg_cli.run.items import Prediction
from clipseg_cli.serve.guard import CLIENT_GONE, Guard
from clipseg_cli.serve.metrics import Metrics
from clipseg_cli.serve.problems import ApiError, error_body, exceeded, invalid
from clipseg_cli.serve.request import LISTS, PROMPT_FILE, REQUEST_FIELDS, Upload, parse_request
from clipseg_cli.serve.service import Job, ServeSettings, Service
from clipseg_cli.version import __version__

#: The page's files (package data), by the name the page asks for.
PAGE_FILES = {"index.html": "text/html", "page.css": "text/css", "page.js": "text/javascript"}
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
#: A form part that is not a file holds at most this much (prompts are far shorter).
MAX_FIELD_BYTES = 64 * 1024


class Serving(Protocol):
    """What the routes need from an engine: the service, and a way to the model."""

    service: Service

    def predict(self, job: Job) -> Awaitable[Prediction]: ...


class Admission:
    """The bounded queue: at most ``size`` requests in the model routes at once."""

    def __init__(self, size: int, metrics: Metrics) -> None:
        self.size = size
        self.inside = 0
        self.metrics = metrics

    def enter(self, seconds_per_image: float) -> None:
        """Admit a request, or raise 503 with ``Retry-After`` (how long the queue takes)."""
        if self.inside >= self.size:
            wait = max(1, min(60, math.ceil(self.inside * seconds_per_image)))
            raise exceeded(
                "max_queue",
                f"{self.inside} requests are in the queue (at most {self.size}); retry later",
                {"Retry-After": str(wait)},
            )
        self.inside += 1
        self.metrics.queue_depth.set(self.inside)

    def leave(self) -> None:
        self.inside -= 1
        self.metrics.queue_depth.set(self.inside)


def create_app(
    settings: ServeSettings,
    serving: Callable[[], Serving | None],
    lifespan: Callable[[FastAPI], object] | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The app. ``serving()`` gives the engine once the model is open (None before: 503).

    ``lifespan``: an async context manager factory the engine runs the app under (the local
    engine starts its batcher there). ``metrics``: the instruments (default: new ones).
    """
    metrics = metrics or Metrics()
    admission = Admission(settings.limits.max_queue, metrics)
    app = FastAPI(
        title="clipseg",
        version=__version__,
        description="Masks from free-form text or image prompts (CLIPSeg). See docs/serve.md.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    page = {
        name: resources.files("clipseg_cli.serve").joinpath("page", name).read_bytes()
        for name in PAGE_FILES
    }

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        phrase = {404: "not found", 405: "method not allowed"}.get(error.status_code, "error")
        return Response(
            error_body(phrase, str(error.detail)),
            status_code=error.status_code,
            media_type="application/json",
            headers=getattr(error, "headers", None),
        )

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _page_file(page, "index.html")

    @app.get("/page/{name}", include_in_schema=False)
    async def page_file(name: str) -> Response:
        if name not in PAGE_FILES:
            raise ApiError(404, "not found", "no such page file")
        return _page_file(page, name)

    @app.get("/healthz", summary="Alive")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="Model loaded and warmed")
    async def readyz() -> Response:
        current = serving()
        if current is None or not current.service.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready", **current.service.details()})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, media_type = metrics.exposition()
        return Response(body, media_type=media_type)

    async def model_route(request: Request, command: str) -> Response:
        current = serving()
        if current is None or not current.service.ready:
            raise ApiError(503, "not ready", "the model is loading", {"Retry-After": "5"})
        admission.enter(current.service.seconds_per_image)
        try:
            return await _answer(request, command, current, settings)
        finally:
            admission.leave()

    @app.post("/v1/segment", summary="Segment one image", openapi_extra=_form_schema("segment"))
    async def segment(request: Request) -> Response:
        return await model_route(request, "segment")

    @app.post("/v1/matte", summary="Matte one image", openapi_extra=_form_schema("matte"))
    async def matte(request: Request) -> Response:
        return await model_route(request, "matte")

    app.add_middleware(Guard, token=settings.token, limits=settings.limits, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            allow_credentials=False,  # Bearer tokens, never cookies: no credentials across sites
            max_age=600,
        )
    return app


def _page_file(page: dict[str, bytes], name: str) -> Response:
    headers = {
        "Content-Security-Policy": PAGE_POLICY,
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }
    return Response(page[name], media_type=PAGE_FILES[name], headers=headers)


async def _answer(request: Request, command: str, serving: Serving, settings: ServeSettings):
    """Read, check and answer one model request (see the module docstring)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.limits.timeout
    service = serving.service
    as_png = "image/png" in request.headers.get("accept", "")
    items = await _read_form(request, settings)
    parsed = parse_request(
        items,
        command,
        settings.base,
        settings.limits,
        service.prompt_files,
        service.input_size[0],
    )
    if as_png:
        config = dataclasses.replace(parsed.config, save=parsed.config.save[:1])
        parsed = dataclasses.replace(parsed, config=config)
    name = f"request-{request.state.request_id}"

    async def work() -> tuple[bytes, str]:
        with service.arriving():
            job = await loop.run_in_executor(service.pool, service.prepare, parsed, name, as_png)
        prediction = await serving.predict(job)  # no await in between: never seen uncounted
        request.state.batch_size = job.batch_images
        return await loop.run_in_executor(service.pool, service.answer, job, prediction)

    task = asyncio.ensure_future(work())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _pending = await asyncio.wait(
            {task, gone}, timeout=max(0.0, deadline - loop.time()), return_when="FIRST_COMPLETED"
        )
    finally:
        gone.cancel()
    if task in done:
        body, media_type = task.result()
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-store"})
    task.cancel()
    if gone in done:
        request.state.error = "the client left; its work was dropped"
        return Response(status_code=CLIENT_GONE)  # never sent: nobody is listening
    raise exceeded("timeout", f"no answer within {settings.limits.timeout:g} s")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_form(request: Request, settings: ServeSettings) -> list[tuple[str, str | Upload]]:
    """The form's fields in order; uploads read into memory (the guard bounds the body)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise invalid("send a multipart/form-data form with the image file in the field image")
    limits = settings.limits
    fields_needed = limits.max_prompts + len(LISTS) + len(REQUEST_FIELDS["segment"]) + 8
    try:
        async with request.form(
            max_files=1 + 2 * limits.max_refs,
            max_fields=fields_needed,
            max_part_size=MAX_FIELD_BYTES,
        ) as form:
            found: list[tuple[str, str | Upload]] = []
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    found.append((name, Upload(value.filename or "", await value.read())))
                else:
                    found.append((name, value))
    except StarletteHTTPException as error:
        detail = str(error.detail)
        if detail.startswith("Too many fields"):
            raise exceeded(
                "max_prompts",
                f"more form fields than a request can have; at most {limits.max_prompts} prompts",
            ) from None
        if detail.startswith("Too many files"):
            raise exceeded(
                "max_refs", f"at most one image and {limits.max_refs} references"
            ) from None
        raise ApiError(400, "malformed request", detail) from None
    return found


def _form_schema(command: str) -> dict:
    """The OpenAPI description of a model route's form (from the same tables as the code)."""
    types = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}
    properties: dict[str, dict] = {
        "image": {"type": "string", "format": "binary", "description": "the image file"},
        "prompt": {"type": "array", "items": {"type": "string"}, "description": "text prompts"},
        "negative": {"type": "array", "items": {"type": "string"}, "description": "suppress"},
        "save": {"type": "string", "description": "comma list of output kinds"},
        PROMPT_FILE: {"type": "string", "description": "a prompt file named at start-up"},
        "ref": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "ref_mask": {"type": "array", "items": {"type": "string", "format": "binary"}},
    }
    for field in REQUEST_FIELDS[command]:
        properties[field.name] = {"type": types[field.kind], "nullable": field.optional}
    schema = {"type": "object", "required": ["image"], "properties": properties}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }
