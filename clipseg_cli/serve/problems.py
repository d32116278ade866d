"""What a refused or failed request gets: one exception type carrying the status, and the JSON
body every error answer has, ``{"error": "...", "detail": "..."}``. A limit's status and
``error`` come from its row of :data:`clipseg_cli.serve.limits.LIMITS`, never from the caller.
"""

from __future__ import annotations

import json

from clipseg_cli.serve.limits import LIMITS_BY_NAME


class ApiError(Exception):
    """A request answered with an error: ``status``, a short ``error`` and a one-line
    ``detail`` (safe to show the client: no paths, no tracebacks)."""

    def __init__(
        self, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.error, self.detail)


def exceeded(limit: str, detail: str, headers: dict[str, str] | None = None) -> ApiError:
    """The answer to a request over the limit named ``limit`` (a row of the table)."""
    row = LIMITS_BY_NAME[limit]
    return ApiError(row.status, row.error, detail, headers)


def invalid(detail: str) -> ApiError:
    """422: a field is missing, unknown or has a bad value."""
    return ApiError(422, "invalid request", detail)


def error_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()
