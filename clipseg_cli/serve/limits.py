"""The server's limits: one table, read by the code (the checks and their status codes), the
command's options (their defaults), the docs (``docs/serve.md`` holds :func:`limits_markdown`,
a test keeps it equal) and the tests (one hostile request per row).

Every limit is checked before work is queued, from what the request has sent so far: the body is
counted while it streams in (``Content-Length`` is not trusted), an image's size is read from its
header before any pixel is decoded.

Standard library only: the command declares its options from this table without loading more.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """One row of the table: the option that sets it, its default, and the answer a request
    that exceeds it gets (status and ``error``)."""

    name: str  # the field of ServeLimits
    default: int | float | str
    status: int
    error: str
    what: str

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


#: The limits, in the order a request meets them.
LIMITS: tuple[Limit, ...] = (
    Limit(
        "max_queue",
        32,
        503,
        "server busy",
        "requests admitted at once (uploading, waiting for the model, being answered); the next "
        "one is answered at once, before its body is read, with `Retry-After`",
    ),
    Limit(
        "read_timeout",
        30.0,
        408,
        "request too slow",
        "seconds for a request's headers and body to arrive (slow clients are dropped)",
    ),
    Limit(
        "max_body",
        25_000_000,
        413,
        "body too large",
        "bytes of a request body, counted while it streams in (`Content-Length` is not trusted)",
    ),
    Limit(
        "max_prompts",
        16,
        422,
        "too many prompts",
        "prompts plus negative prompts of one request",
    ),
    Limit(
        "max_prompt_chars",
        300,
        422,
        "prompt too long",
        "characters of one prompt (CLIP reads 77 tokens, about 300 characters)",
    ),
    Limit(
        "max_refs",
        4,
        422,
        "too many reference images",
        "reference images (image prompts) of one request",
    ),
    Limit(
        "formats",
        "JPEG,PNG,WEBP,GIF,BMP",
        415,
        "unsupported image format",
        "image formats accepted (Pillow's names); other files are not even parsed",
    ),
    Limit(
        "max_pixels",
        25_000_000,
        413,
        "image too large",
        "pixels of an image or reference, read from its header before decoding (the "
        "decompression-bomb guard)",
    ),
    Limit(
        "max_tiles",
        32,
        422,
        "too many tiles",
        "model rows of one image with `tiles` (each tile is one more pass of the vision model)",
    ),
    Limit(
        "timeout",
        60.0,
        504,
        "deadline exceeded",
        "seconds from a request's arrival to its answer; work not started by then is dropped",
    ),
)

LIMITS_BY_NAME = {limit.name: limit for limit in LIMITS}


@dataclass(frozen=True)
class ServeLimits:
    """The values a server runs with (defaults: :data:`LIMITS`)."""

    max_queue: int = LIMITS_BY_NAME["max_queue"].default
    read_timeout: float = LIMITS_BY_NAME["read_timeout"].default
    max_body: int = LIMITS_BY_NAME["max_body"].default
    max_prompts: int = LIMITS_BY_NAME["max_prompts"].default
    max_prompt_chars: int = LIMITS_BY_NAME["max_prompt_chars"].default
    max_refs: int = LIMITS_BY_NAME["max_refs"].default
    formats: str = LIMITS_BY_NAME["formats"].default
    max_pixels: int = LIMITS_BY_NAME["max_pixels"].default
    max_tiles: int = LIMITS_BY_NAME["max_tiles"].default
    timeout: float = LIMITS_BY_NAME["timeout"].default

    def __post_init__(self) -> None:
        for limit in LIMITS:
            value = getattr(self, limit.name)
            if isinstance(value, str):
                if not self.format_names:
                    raise ValueError(f"{limit.option}: name at least one format")
            elif value <= 0:
                raise ValueError(f"{limit.option} {value}: must be positive")
        object.__setattr__(self, "formats", ",".join(self.format_names))

    @property
    def format_names(self) -> tuple[str, ...]:
        """``formats`` as Pillow's upper-case names."""
        return tuple(dict.fromkeys(n.strip().upper() for n in self.formats.split(",") if n.strip()))


def parse_size(text: str) -> int:
    """``25MB``, ``200k``, ``1.5G`` or a number of bytes -> bytes (decimal units).

    Raises:
        ValueError: not a size (one line).
    """
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "")
    try:
        size = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size (bytes, or 25MB, 200k)") from None
    return int(size)


def limits_markdown() -> str:
    """The table of limits as ``docs/serve.md`` shows it."""
    lines = [
        "| option | default | status | `error` | what it bounds |",
        "|---|---|---|---|---|",
    ]
    for limit in LIMITS:
        lines.append(
            f"| `{limit.option}` | `{limit.default}` | {limit.status} | {limit.error} | "
            f"{limit.what} |"
        )
    return "\n".join(lines) + "\n"


#: Not limits, but answered the same way: what a request gets for each other kind of problem.
OTHER_ERRORS: tuple[tuple[int, str, str], ...] = (
    (400, "malformed request", "the body is not a well-formed multipart form"),
    (
        401,
        "unauthorized",
        "missing or wrong `Authorization: Bearer` token; checked before "
        "anything of the request is read",
    ),
    (404, "not found", "no such route"),
    (406, "not acceptable", "`Accept: image/png` with more than one prompt"),
    (
        422,
        "invalid request",
        "a missing image or prompt, an unknown field, a bad value, an image that cannot be decoded",
    ),
    (500, "internal error", "a bug: the answer names the request id, the log has the details"),
)

__all__ = [
    "LIMITS",
    "LIMITS_BY_NAME",
    "OTHER_ERRORS",
    "Limit",
    "ServeLimits",
    "limits_markdown",
    "parse_size",
]
