"""``clipseg serve``: the model resident behind an HTTP API and a web page (docs/serve.md).

Options -> :class:`~clipseg_cli.serve.service.ServeSettings` -> an engine (uvicorn here, or Ray
Serve) -> the URL it listens on as the first line on stdout; notices and the request log (one
JSON line per request) on stderr. The limits' options take their defaults from the one table of
limits (:data:`clipseg_cli.serve.limits.LIMITS`).
"""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from clipseg_cli.commands import options as o
from clipseg_cli.commands.console import ExitCode, exit_on_error, fail

# The limits' table is standard library only: the options read their defaults from it.
from clipseg_cli.serve.limits import LIMITS_BY_NAME as L
from clipseg_cli.serve.limits import ServeLimits, parse_size
from clipseg_cli.specs import DEFAULT_MODEL

INSTALL_HINT = "pip install 'clipseg-cli[serve]'"
DEFAULT_PORT = 8765
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _limit_help(name: str, text: str) -> str:
    row = L[name]
    return f"{text} (answered {row.status} '{row.error}')."


def require_serve() -> None:
    """The ``[serve]`` extra, or a usage error saying how to install it."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise fail(
            f"clipseg serve needs the [serve] extra: {INSTALL_HINT}", ExitCode.USAGE
        ) from None


def parse_prompt_files(values: list[str]) -> tuple[tuple[str, Path], ...]:
    """``NAME=PATH`` pairs of ``--prompt-file``.

    Raises:
        ValueError: not NAME=PATH, a bad name, or a file that is not there.
    """
    found = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not _NAME.match(name) or not path:
            raise ValueError(
                f"--prompt-file {value}: expected NAME=PATH (NAME: letters, digits, _.-)"
            )
        if not Path(path).is_file():
            raise ValueError(f"--prompt-file {value}: no such file {path}")
        found.append((name, Path(path)))
    return tuple(found)


def _size(option: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from None


def check_exposure(host: str, token: str | None, no_auth: bool) -> None:
    """A server reachable from other machines needs a token unless ``--no-auth`` says so.

    Raises:
        ValueError: one line saying why not and what to do.
    """
    if token is not None and no_auth:
        raise ValueError("give --token (or CLIPSEG_TOKEN) or --no-auth, not both")
    if token is not None or no_auth or _loopback(host):
        return
    raise ValueError(
        f"--host {host} makes the server reachable from other machines: give --token TOKEN "
        "(or set CLIPSEG_TOKEN) so that only clients with it are answered, or --no-auth to "
        "serve anyone"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def serve(
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Anything but loopback needs --token (or --no-auth)."
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port (0: a free one; the URL is the first line on stdout).")
    ] = DEFAULT_PORT,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CLIPSEG_TOKEN",
            help="Clients must send 'Authorization: Bearer TOKEN' (default: $CLIPSEG_TOKEN).",
            show_default=False,
            show_envvar=False,
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve without a token on a non-loopback --host.")
    ] = False,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="Allow browser pages of this origin to call the API (repeatable)."),
    ] = None,
    prompt_file: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=PATH: prompts saved by --save-prompt, named by requests' prompt_file "
            "(repeatable; the first is the default of requests without prompts)."
        ),
    ] = None,
    model: o.ModelOpt = DEFAULT_MODEL,
    clip_weights: o.ClipWeightsOpt = None,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = "auto",
    backend: o.BackendOpt = "auto",
    max_batch: Annotated[
        int | None,
        typer.Option(
            help="Images per model call, gathered across requests (default: 8 where the "
            "backend's results do not depend on the batch, else clipseg segment's batch size).",
            show_default=False,
        ),
    ] = None,
    max_wait_ms: Annotated[
        float,
        typer.Option(help="How long a model call waits for requests being decoded to join it."),
    ] = 20.0,
    workers: Annotated[int, typer.Option(help="Decode and answer threads.")] = 2,
    engine: Annotated[
        Literal["local", "ray"],
        typer.Option(help="local (uvicorn, this process) or ray (a Ray Serve deployment)."),
    ] = "local",
    replicas: Annotated[
        int | None,
        typer.Option(
            help="Ray Serve replicas, each holding the model (default: autoscaling from 1).",
            show_default=False,
        ),
    ] = None,
    ray_address: o.RayAddressOpt = None,
    max_queue: Annotated[
        int, typer.Option(help=_limit_help("max_queue", "Requests admitted at once"))
    ] = L["max_queue"].default,
    read_timeout: Annotated[
        float,
        typer.Option(help=_limit_help("read_timeout", "Seconds for headers and body to arrive")),
    ] = L["read_timeout"].default,
    max_body: Annotated[
        str, typer.Option(help=_limit_help("max_body", "Largest request body (25MB, 200k)"))
    ] = f"{L['max_body'].default / 1e6:g}MB",
    max_prompts: Annotated[
        int, typer.Option(help=_limit_help("max_prompts", "Prompts + negatives per request"))
    ] = L["max_prompts"].default,
    max_prompt_chars: Annotated[
        int, typer.Option(help=_limit_help("max_prompt_chars", "Characters per prompt"))
    ] = L["max_prompt_chars"].default,
    max_refs: Annotated[
        int, typer.Option(help=_limit_help("max_refs", "Reference images per request"))
    ] = L["max_refs"].default,
    formats: Annotated[
        str, typer.Option(help=_limit_help("formats", "Image formats accepted"))
    ] = L["formats"].default,
    max_pixels: Annotated[
        int, typer.Option(help=_limit_help("max_pixels", "Pixels of an image (bomb guard)"))
    ] = L["max_pixels"].default,
    max_tiles: Annotated[
        int, typer.Option(help=_limit_help("max_tiles", "Model rows of one image with tiles"))
    ] = L["max_tiles"].default,
    timeout: Annotated[
        float, typer.Option(help=_limit_help("timeout", "Seconds from arrival to answer"))
    ] = L["timeout"].default,
) -> None:
    """Serve masks over HTTP: the model loaded once, an API, a web page (docs/serve.md)."""
    require_serve()
    from clipseg_cli.run.config import SegmentConfig
    from clipseg_cli.serve.guard import log_to_stderr
    from clipseg_cli.serve.service import WARMUP_PROMPT, ServeSettings

    with exit_on_error():
        check_exposure(host, token, no_auth)
        limits = ServeLimits(
            max_queue=max_queue,
            read_timeout=read_timeout,
            max_body=_size("--max-body", max_body),
            max_prompts=max_prompts,
            max_prompt_chars=max_prompt_chars,
            max_refs=max_refs,
            formats=formats,
            max_pixels=max_pixels,
            max_tiles=max_tiles,
            timeout=timeout,
        )
        base = SegmentConfig(
            inputs=("request",),
            out_dir=Path(),  # answers go to memory: nothing is ever written
            prompts=(WARMUP_PROMPT,),
            model=model,
            clip_weights=clip_weights,
            device=device,
            precision=precision,
            backend=backend,
            max_pixels=limits.max_pixels,
            workers=workers,
            engine=engine,
            ray_address=ray_address,
        )
        settings = ServeSettings(
            base=base,
            limits=limits,
            prompt_files=parse_prompt_files(prompt_file or []),
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            workers=workers,
            token=token,
            cors_origins=tuple(cors_origin or ()),
        )
        if replicas is not None and replicas < 1:
            raise ValueError("--replicas must be at least 1")
        log_to_stderr()

        def notice(message: str) -> None:
            typer.echo(f"clipseg: {message}", err=True)

        def listening(url: str) -> None:
            typer.echo(url)  # the first line on stdout: scripts read it
            sys.stdout.flush()
            who = "clients with the token" if token else "anyone who can reach it"
            notice(f"serving {model} at {url} for {who}; stop with Ctrl-C")

        try:
            if engine == "ray":
                from clipseg_cli.serve import ray as ray_engine

                ray_engine.run(settings, host, port, replicas, listening, notice)
            else:
                from clipseg_cli.serve import local

                local.run(settings, host, port, listening, notice)
        except KeyboardInterrupt:  # after a graceful stop: what was in flight was answered
            notice("stopped")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
