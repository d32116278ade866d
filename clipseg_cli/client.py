"""A Python client of ``clipseg serve`` (httpx): masks of an image as numpy arrays.

Example::

    from clipseg_cli.client import Client

    with Client("http://127.0.0.1:8765", token="...") as client:
        masks = client.segment("photo.jpg", ["a dog", "a cat"])  # bool [2, H, W]
        answer = client.request("photo.jpg", ["a dog"], save="mask,overlay", threshold=0.4)

Every option of the API is a keyword argument (its field name, docs/serve.md). A refused or
failed request raises :class:`ServerError` with the server's status, ``error`` and ``detail``;
``503`` (busy) is retried after the server's ``Retry-After``, up to ``retries`` times.

Standard library, numpy, Pillow and httpx only: it never loads a model.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

Source = str | Path | bytes | np.ndarray | Image.Image


class ServerError(Exception):
    """The server refused or failed a request."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def _encoded(image: Source) -> tuple[str, bytes]:
    """A file name and the bytes to upload: files as they are, arrays and PIL images as PNG."""
    if isinstance(image, bytes):
        return "image", image
    if isinstance(image, str | Path):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "image.png", buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """A PNG's pixels as numpy (grey ``[H, W]``, RGB ``[H, W, 3]``, RGBA ``[H, W, 4]``)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


class Client:
    """A connection to one server.

    Args:
        url: the server's address (``clipseg serve`` prints it as its first line).
        token: the server's token (``Authorization: Bearer``), if it has one.
        timeout: seconds to wait for an answer.
        retries: how many times a 503 (busy) is retried after its ``Retry-After``.
    """

    def __init__(
        self, url: str, token: str | None = None, timeout: float = 120.0, retries: int = 3
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        self.retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def ready(self) -> bool:
        """Whether the model is loaded and warmed (``/readyz``)."""
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def request(
        self,
        image: Source,
        prompts: Sequence[str] = (),
        *,
        negatives: Sequence[str] = (),
        route: str = "/v1/segment",
        **options: object,
    ) -> dict:
        """The server's JSON answer (``width``, ``height``, ``prompts``, ``outputs``, ...).

        ``options``: the API's fields (``save="mask,overlay"``, ``threshold=0.4``,
        ``refine="none"``, ``prompt_file="dogs"``...).
        """
        name, data = _encoded(image)
        fields: dict[str, str | list[str]] = {"prompt": list(prompts), "negative": list(negatives)}
        fields |= {key: _text(value) for key, value in options.items() if value is not None}
        for attempt in range(self.retries + 1):
            response = self.http.post(
                route,
                data=fields,
                files={"image": (name, data)},
                headers={"Accept": "application/json"},
            )
            if response.status_code == 503 and attempt < self.retries:
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            break
        if response.status_code != 200:
            raise _error(response)
        return response.json()

    def segment(
        self, image: Source, prompts: Sequence[str], *, negatives: Sequence[str] = (), **options
    ) -> np.ndarray:
        """bool ``[K, H, W]``: each prompt's mask (the ``mask`` PNGs the server made)."""
        answer = self.request(image, prompts, negatives=negatives, save="mask", **options)
        masks = [decode_png(base64.b64decode(o["png_base64"])) > 127 for o in answer["outputs"]]
        return np.stack(masks) if masks else np.zeros((0, answer["height"], answer["width"]), bool)

    def outputs(self, image: Source, prompts: Sequence[str], **options) -> dict:
        """``{(prompt, kind): PNG bytes}`` of every output of one request."""
        answer = self.request(image, prompts, **options)
        return {
            (o["prompt"], o["kind"]): base64.b64decode(o["png_base64"]) for o in answer["outputs"]
        }


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _error(response: httpx.Response) -> ServerError:
    try:
        body = response.json()
        return ServerError(response.status_code, body.get("error", ""), body.get("detail", ""))
    except ValueError:
        return ServerError(response.status_code, "error", response.text[:200])
