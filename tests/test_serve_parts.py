"""The server's parts without a model: the limits' table and the docs, request fields taken from
the run's options by name, refusing paths and unknown fields, who may listen where, CORS, and
how jobs share model calls (the batch policy's measurement on backends that do and do not
depend on their batch)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipseg_cli.commands.serve import check_exposure
from clipseg_cli.io import writers
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.serve.app import create_app
from clipseg_cli.serve.limits import LIMITS, ServeLimits, limits_markdown, parse_size
from clipseg_cli.serve.problems import ApiError
from clipseg_cli.serve.request import (
    REQUEST_FIELDS,
    Upload,
    fields_markdown,
    parse_request,
    request_fields,
)
from clipseg_cli.serve.service import BatchPolicy, ServeSettings, measure_batch_policy, shared_calls

REPO = Path(__file__).resolve().parent.parent
BASE = SegmentConfig(inputs=("request",), out_dir=Path(), prompts=("warm",), model="demo")
PNG = writers.image_png(np.zeros((48, 64, 3), np.uint8))


def test_limits_table_options_and_docs_agree() -> None:
    assert [f.name for f in dataclasses.fields(ServeLimits)] == [limit.name for limit in LIMITS]
    assert all(getattr(ServeLimits(), limit.name) == limit.default for limit in LIMITS)
    docs = (REPO / "docs" / "serve.md").read_text()
    hint = "docs/serve.md must show the code's tables (paste limits_markdown() / fields_markdown())"
    assert limits_markdown() in docs, hint
    assert fields_markdown("segment") in docs and fields_markdown("matte") in docs, hint
    with pytest.raises(ValueError, match="--max-queue"):
        ServeLimits(max_queue=0)
    assert ServeLimits(formats="jpeg, png").format_names == ("JPEG", "PNG")
    assert [parse_size(t) for t in ("25MB", "200k", "1000", "1.5G")] == [
        25_000_000,
        200_000,
        1000,
        1_500_000_000,
    ]


def test_request_fields_are_the_configs_output_options_by_name() -> None:
    names = {field.name for field in REQUEST_FIELDS["segment"]}
    assert {"threshold", "refine", "tiles", "grow", "fill_holes", "min_area", "invert"} <= names
    assert {"feather", "soft_bits", "cutout_alpha", "mix", "ref_mode"} <= names
    # Nothing that names a file, a model or a place; nothing the server fixes.
    assert not names & {"model", "prompt_embedding", "refs", "out_dir", "sam_model", "exports"}
    assert not names & {"precision", "max_pixels", "allow_truncated", "background"}
    matte = {field.name for field in REQUEST_FIELDS["matte"]}
    assert {"background", "matte_bits"} <= matte and not matte & {"soft_bits", "cutout_alpha"}

    # A new option of segment that decides outputs becomes a request field without a change.
    @dataclasses.dataclass(frozen=True)
    class Grown(SegmentConfig):
        min_score: float = dataclasses.field(default=0.0, metadata={"fingerprint": "value"})
        split: bool = dataclasses.field(default=False, metadata={"fingerprint": "value"})

    grown = {f.name: f for f in request_fields("segment", Grown)}
    assert grown["min_score"].kind == "float" and grown["split"].kind == "bool"


def _parse(fields: list[tuple[str, str | Upload]], command: str = "segment", **files):
    return parse_request(fields, command, BASE, ServeLimits(), files, 128)


def test_requests_are_checked_field_by_field() -> None:
    image = ("image", Upload("x.png", PNG))
    parsed = _parse([image, ("prompt", "a dog"), ("fill-holes", "yes"), ("min_area", "")])
    assert parsed.config.fill_holes is True and parsed.config.min_area is None
    assert parsed.config.prompts == ("a dog",) and parsed.config.save == ("mask",)
    refused = {
        "unknown field 'model'": [image, ("prompt", "x"), ("model", "/etc/passwd")],
        "unknown field 'prompt_embedding'": [image, ("prompt_embedding", "/etc/passwd")],
        "prompt_file '/etc/passwd': unknown": [image, ("prompt_file", "/etc/passwd")],
        "ref must be a file upload": [image, ("ref", "/etc/passwd")],
        "image must be a file upload": [("image", "/etc/passwd")],
        "'prompt' is not a file field": [image, ("prompt", Upload("p.txt", b"x"))],
        "grow 'two': expected int": [image, ("prompt", "x"), ("grow", "two")],
        "threshold 'nan': expected float": [image, ("prompt", "x"), ("threshold", "nan")],
        "threshold 2.0: must be between 0 and 1": [image, ("prompt", "x"), ("threshold", "2")],
        "save logits is not served": [image, ("prompt", "x"), ("save", "mask,logits")],
        "refine sam is not served": [image, ("prompt", "x"), ("refine", "sam")],
        "exactly one image": [("prompt", "x")],
        "no prompt": [image],
    }
    for message, fields in refused.items():
        with pytest.raises(ApiError) as error:
            _parse(fields)
        assert error.value.status == 422 and message in error.value.detail, error.value.detail
    with pytest.raises(ApiError, match="background") as error:
        _parse([image, ("prompt", "x"), ("background", "/etc/hostname")], "matte")
    with pytest.raises(ApiError) as error:
        _parse([image, ("prompt", "x"), ("tiles", "50")])
    assert error.value.status == 422 and error.value.error == "too many tiles"


def test_references_are_uploads_never_paths() -> None:
    image = ("image", Upload("x.png", PNG))
    ref = ("ref", Upload("../../etc/passwd", PNG))
    parsed = _parse([image, ref, ("prompt", "a dog"), ("mix", "0.5")])
    (reference,) = parsed.references
    assert reference.name == "passwd" and reference.image == PNG and reference.mask is None
    # The config only counts references (--mix needs one) under names that are no file.
    assert [str(p) for p in parsed.config.refs] == ["<upload 1>"]
    with pytest.raises(ApiError) as error:
        masks = [("ref_mask", Upload(f"{n}.png", PNG)) for n in "mno"]
        _parse([image, ref, ("ref", Upload("b.png", PNG)), *masks])
    assert "more ref_mask than ref" in error.value.detail
    with pytest.raises(ApiError) as error:
        _parse([image, ("ref", Upload("r.txt", b"not an image"))])
    assert error.value.status == 415


def test_who_may_listen_where() -> None:
    check_exposure("127.0.0.1", None, False)
    check_exposure("::1", None, False)
    check_exposure("localhost", None, False)
    check_exposure("0.0.0.0", "t" * 32, False)
    check_exposure("0.0.0.0", None, True)
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(ValueError, match="--token"):
            check_exposure(host, None, False)
    with pytest.raises(ValueError, match="not both"):
        check_exposure("127.0.0.1", "t" * 32, True)


def test_serve_on_all_interfaces_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "clipseg_cli", "serve", "--host", "0.0.0.0", "--model", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipseg: error: --host 0.0.0.0"), lines


def test_cors_is_off_unless_origins_are_named() -> None:
    settings = ServeSettings(base=BASE)
    with TestClient(create_app(settings, lambda: None)) as client:
        answer = client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
        preflight = client.options(
            "/v1/segment",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
        # Not ready yet: model routes answer 503 with Retry-After, health is fine.
        busy = client.post("/v1/segment")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert client.get("/readyz").status_code == 503
        assert client.get("/nope").json() == {"error": "not found", "detail": "Not Found"}
    allowed = ServeSettings(base=BASE, cors_origins=("https://app.example",), token="t" * 32)
    with TestClient(create_app(allowed, lambda: None)) as client:
        preflight = client.options(
            "/v1/segment",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in preflight.headers
        other = client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        page = client.get("/")
        assert (
            page.status_code == 200
            and "default-src 'self'" in page.headers["content-security-policy"]
        )
        assert client.get("/page/app.py").status_code == 404  # only the page's own files
        assert client.get("/page/..%2f..%2fetc%2fpasswd").status_code == 404
        assert client.get("/metrics").status_code == 401


@dataclasses.dataclass
class _Job:
    prompts: object


@dataclasses.dataclass
class _Prompts:
    vectors: np.ndarray


def test_jobs_share_calls_with_the_union_of_their_prompts() -> None:
    a, b, c = np.eye(3, dtype=np.float32)
    jobs = [_Job(_Prompts(np.stack(v))) for v in ([a, b], [b], [c, a], [a, b])]
    independent = BatchPolicy(True, True, 8, False)
    ((vectors, members),) = shared_calls(jobs, independent, max_prompts=16)
    assert vectors.shape == (3, 3)
    for job, columns in members:
        assert np.array_equal(vectors[columns], job.prompts.vectors)
    # Not independent: one call per distinct prompt set, each exactly the job's own vectors.
    groups = shared_calls(jobs, BatchPolicy(True, False, 8, False), max_prompts=16)
    assert len(groups) == 3
    assert [len(members) for _vectors, members in groups] == [2, 1, 1]
    # The union stays within --max-prompts vectors per call.
    small = shared_calls(jobs, independent, max_prompts=2)
    assert [len(vectors) for vectors, _members in small] == [2, 2]
    assert sum(len(members) for _vectors, members in small) == len(jobs)


class _Backend:
    """A stand-in backend: logits from each image's mean and each prompt, plus what the
    batch changes (``batch_noise``: the batch's size; ``prompt_noise``: the prompt count)."""

    def __init__(self, batch_noise: bool = False, prompt_noise: bool = False) -> None:
        self.batch_noise = batch_noise
        self.prompt_noise = prompt_noise

    def logits(self, pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
        means = pixels.reshape(len(pixels), -1).mean(axis=1).astype(np.float32)
        out = means[:, None, None, None] + conditionals.sum(axis=1)[None, :, None, None]
        out = np.broadcast_to(out, (len(pixels), len(conditionals), 4, 4)).copy()
        if self.batch_noise:
            out += np.float32(1e-3) * len(pixels)
        if self.prompt_noise:
            out += np.float32(1e-3) * len(conditionals)
        return out


def test_the_batch_policy_is_measured() -> None:
    cond = np.ones((1, 8), np.float32)
    assert measure_batch_policy(_Backend(), cond, 32, 8, 1) == BatchPolicy(True, True, 8, False)
    # Results that depend on the batch: calls are the CLI's, padded to its batch size.
    assert measure_batch_policy(_Backend(batch_noise=True), cond, 32, 8, 1) == BatchPolicy(
        False, True, 1, True
    )
    assert measure_batch_policy(_Backend(prompt_noise=True), cond, 32, 8, 16) == BatchPolicy(
        True, False, 8, False
    )


def test_an_idle_server_hands_freed_memory_back_once_and_a_busy_one_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a model call, once nothing has come for IDLE_SECONDS, freed memory is handed back
    on the model's thread; a request arriving meanwhile puts it off to the next idle time."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from clipseg_cli.serve import batching

    monkeypatch.setattr(batching, "IDLE_SECONDS", 1.0)
    trims: list[str] = []
    monkeypatch.setattr(
        batching.memory,
        "return_freed_memory",
        lambda: trims.append(threading.current_thread().name),
    )
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
    service = SimpleNamespace(
        policy=SimpleNamespace(call_rows=4),
        incoming=0,
        model_thread=model_thread,
        predict=lambda jobs: [f"prediction of {job.name}" for job in jobs],
    )

    async def scenario() -> None:
        batcher = batching.LocalBatcher(service, max_wait_ms=0)
        batcher.start()
        job = SimpleNamespace(rows=1, name="a")
        assert await batcher.predict(job) == "prediction of a"
        for _ in range(6):  # a request every 0.05 s: never idle for 1 s
            await asyncio.sleep(0.05)
            await batcher.predict(job)
        assert trims == []
        await asyncio.sleep(1.5)
        assert len(trims) == 1 and trims[0].startswith("model")
        await asyncio.sleep(1.5)  # idle on: nothing more to hand back
        assert len(trims) == 1
        await batcher.stop()

    try:
        asyncio.run(scenario())
    finally:
        model_thread.shutdown()
