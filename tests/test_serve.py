"""``clipseg serve`` end to end: one real server (the demo model, an ephemeral port on
127.0.0.1, a token, small limits) for the whole module.

- its PNGs equal ``clipseg segment``'s (and ``matte``'s) files byte for byte, for the bundled
  scenes and several option sets, while concurrent requests share model calls;
- image prompts, start-up prompt files, one-PNG answers, instances with their RLE, the client;
- every hostile request of the issue, each followed by a good request that succeeds;
- overload: 64 clients against ``--max-queue 8``;
- the page, in a real headless Chromium.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from serve_helpers import Served, start_server, wait_until
from typer.testing import CliRunner

from clipseg_cli.client import Client, ServerError
from clipseg_cli.commands.app import app
from clipseg_cli.ops.shapes import make_scene

REPO = Path(__file__).resolve().parent.parent
SCENES = sorted((REPO / "sample_data").glob("shapes-*.png"))
#: A bundled scene with a red and a yellow circle (clipseg_cli.ops.shapes.make_scene(90000034)).
CIRCLES = REPO / "sample_data" / "shapes-90000034.png"
CIRCLES_SEED = 90000034
TOKEN = "test-token-" + "x" * 24
READ_TIMEOUT = 2.0
MAX_BODY = 4_000_000
PROMPT_FILE_PROMPTS = ("a blue square", "a yellow triangle")

#: (route, request fields, the same options on the command line)
OPTION_SETS = [
    (
        "segment",
        {"prompt": ["a red circle", "a blue square"], "save": "mask,soft,overlay"},
        ["-p", "a red circle", "-p", "a blue square", "--save", "mask,soft,overlay"],
    ),
    (
        "segment",
        {
            "prompt": ["a yellow triangle"],
            "refine": "none",
            "threshold": "0.5",
            "soft_bits": "16",
            "cutout_alpha": "mask",
            "save": "mask,soft,overlay,cutout",
        },
        [
            *("-p", "a yellow triangle", "--refine", "none", "--threshold", "0.5"),
            *("--soft-bits", "16", "--cutout-alpha", "mask", "--save", "mask,soft,overlay,cutout"),
        ],
    ),
    (
        "segment",
        {
            "prompt": ["a red circle", "a green triangle"],
            "negative": ["a blue square"],
            "grow": "3",
            "fill_holes": "true",
            "min_area": "50",
            "feather": "2",
            "save": "mask,soft,cutout,labels,instances",
        },
        [
            *("-p", "a red circle", "-p", "a green triangle", "--negative", "a blue square"),
            *("--grow", "3", "--fill-holes", "--min-area", "50", "--feather", "2"),
            *("--save", "mask,soft,cutout,labels,instances"),
        ],
    ),
    (
        "segment",
        {"prompt": ["a blue circle"], "tiles": "2", "invert": "yes", "save": "mask,overlay"},
        ["-p", "a blue circle", "--tiles", "2", "--invert", "--save", "mask,overlay"],
    ),
    (
        "matte",
        {
            "prompt": ["a red circle"],
            "save": "matte,cutout,composite",
            "background": "#00ff00",
            "matte_bits": "16",
        },
        [
            *("-p", "a red circle", "--save", "matte,cutout,composite"),
            *("--background", "#00ff00", "--matte-bits", "16"),
        ],
    ),
]


def _cli(command: str, *args: str) -> None:
    result = CliRunner().invoke(
        app, [command, *args, "--model", "demo", "--device", "cpu", "--progress", "none"]
    )
    assert result.exit_code == 0, result.output


def _rows(out: Path) -> dict[str, dict]:
    log = out / "clipseg-log.jsonl"
    return {Path(row["input"]).name: row for row in map(json.loads, log.read_text().splitlines())}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompts saved by ``segment --save-prompt`` (the server names it at start-up)."""
    root = tmp_path_factory.mktemp("prompt-file")
    path = root / "shapes.prompt.safetensors"
    prompts = [arg for p in PROMPT_FILE_PROMPTS for arg in ("-p", p)]
    _cli("segment", str(SCENES[0]), *prompts, "--save-prompt", str(path), "--out", str(root / "o"))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, prompt_file: Path):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = [
        *("--model", "demo", "--device", "cpu", "--prompt-file", f"shapes={prompt_file}"),
        *("--read-timeout", str(READ_TIMEOUT), "--max-body", str(MAX_BODY)),
        *("--max-queue", "8", "--max-pixels", "4000000", "--max-wait-ms", "20"),
    ]
    server = start_server(args, log, TOKEN)
    try:
        assert wait_until(lambda: httpx.get(server.url + "readyz").status_code == 200, 60)
        yield server
    finally:
        code = server.stop()
        assert code in (0, -15, 143), server.log.read_text()[-2000:]


def _post(
    served: Served,
    fields: dict,
    image: bytes | None,
    route: str = "segment",
    headers: dict | None = None,
    name: str = "scene.png",
) -> httpx.Response:
    data = {key: _listed(value) for key, value in fields.items()}
    files = {"image": (name, image, "application/octet-stream")} if image is not None else None
    return httpx.post(
        f"{served.url}v1/{route}",
        data=data,
        files=files,
        headers={**served.headers(), **(headers or {})},
        timeout=60,
    )


def _listed(value) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _outputs(answer: dict) -> dict[tuple, bytes]:
    return {(o["prompt"], o["kind"]): base64.b64decode(o["png_base64"]) for o in answer["outputs"]}


def assert_serving(served: Served) -> None:
    """A good request right after a hostile one: answered, and right."""
    response = _post(served, {"prompt": "a red circle"}, CIRCLES.read_bytes())
    assert response.status_code == 200, response.text
    mask = np.asarray(Image.open(io.BytesIO(_outputs(response.json())[("a red circle", "mask")])))
    circle = next(o.mask for o in make_scene(CIRCLES_SEED).objects if o.label == "red circle")
    found = mask > 127
    assert (found & circle).sum() / (found | circle).sum() > 0.5


# -- answers equal the CLI's files --------------------------------------------------------------


def test_answers_equal_the_cli_files_while_batched(served: Served, tmp_path: Path) -> None:
    expected = {}
    for index, (route, _fields, cli_args) in enumerate(OPTION_SETS):
        out = tmp_path / f"cli-{index}"
        _cli(route, *map(str, SCENES), *cli_args, "--out", str(out))
        expected[index] = _rows(out)
    jobs = [(index, scene) for index in range(len(OPTION_SETS)) for scene in SCENES]

    def ask(job):
        index, scene = job
        route, fields, _cli_args = OPTION_SETS[index]
        return _post(served, fields, scene.read_bytes(), route, name=scene.name)

    with ThreadPoolExecutor(8) as pool:  # --max-queue 8: every request is admitted
        responses = list(pool.map(ask, jobs))
    batch_sizes = []
    compared = 0
    for (index, scene), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        answer = response.json()
        row = expected[index][scene.name]
        assert (answer["width"], answer["height"]) == (row["width"], row["height"])
        assert answer["prompts"] == row["prompts"]  # exactly the log row's stats
        if "instances" in row:
            assert [{k: v for k, v in i.items() if k != "rle"} for i in answer["instances"]] == (
                row["instances"]
            )
        files = {(o["prompt"], o["kind"]): Path(o["path"]).read_bytes() for o in row["outputs"]}
        assert _outputs(answer) == files, (index, scene.name)
        compared += len(files)
        batch_sizes.append(answer["batch_size"])
    assert compared >= 60
    # Requests shared model calls: byte identity held while batched.
    assert max(batch_sizes) > 1, batch_sizes


def test_one_png_answer_and_406(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    _cli("segment", str(SCENES[1]), "-p", "a blue square", "--out", str(out))
    mask_file = Path(_rows(out)[SCENES[1].name]["outputs"][0]["path"])
    png = {"Accept": "image/png"}
    response = _post(served, {"prompt": "a blue square"}, SCENES[1].read_bytes(), headers=png)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == mask_file.read_bytes()
    two = _post(served, {"prompt": ["a", "b"]}, SCENES[1].read_bytes(), headers=png)
    assert two.status_code == 406 and two.json()["error"] == "not acceptable"


def test_instances_carry_their_rle(served: Served) -> None:
    fields = {"prompt": ["a red circle", "a yellow circle"], "save": "instances"}
    answer = _post(served, fields, CIRCLES.read_bytes()).json()
    maps = {
        prompt: np.asarray(Image.open(io.BytesIO(data)))
        for (prompt, _kind), data in _outputs(answer).items()
    }
    assert {i["prompt"] for i in answer["instances"]} == set(maps), "both circles are found"
    for instance in answer["instances"]:
        decoded = mask_utils.decode(instance["rle"]).astype(bool)
        assert np.array_equal(decoded, maps[instance["prompt"]] == instance["id"])
        assert int(decoded.sum()) == instance["area"]
        assert mask_utils.toBbox(instance["rle"]).tolist() == instance["bbox"]


def test_image_prompt_and_prompt_file_equal_the_cli(
    served: Served, prompt_file: Path, tmp_path: Path
) -> None:
    scene = make_scene(CIRCLES_SEED)
    circle = next(o for o in scene.objects if o.label == "red circle")
    cutout = tmp_path / "cutout.png"
    rgba = np.dstack([scene.image, np.where(circle.mask, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba).save(cutout)
    out = tmp_path / "ref"
    _cli("segment", str(SCENES[2]), "--ref", str(cutout), "--save", "mask,soft", "--out", str(out))
    files = [Path(o["path"]).read_bytes() for o in _rows(out)[SCENES[2].name]["outputs"]]
    response = httpx.post(
        f"{served.url}v1/segment",
        data={"save": "mask,soft"},
        # The file name is only a label: a path in it names nothing on the server.
        files=[
            ("image", ("s.png", SCENES[2].read_bytes())),
            ("ref", ("../../etc/passwd", cutout.read_bytes())),
        ],
        headers=served.headers(),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [o["prompt"] for o in answer["outputs"]] == ["ref:passwd", "ref:passwd"]
    assert [base64.b64decode(o["png_base64"]) for o in answer["outputs"]] == files

    # A reference with its object mask (and a text prompt mixed in), as --ref --ref-mask --mix.
    photo, mask = tmp_path / "ref.png", tmp_path / "ref-mask.png"
    Image.fromarray(scene.image).save(photo)
    Image.fromarray(np.where(circle.mask, 255, 0).astype(np.uint8)).save(mask)
    out = tmp_path / "ref-mask"
    _cli(
        "segment",
        str(SCENES[2]),
        *("--ref", str(photo), "--ref-mask", str(mask), "-p", "a circle", "--mix", "0.5"),
        *("--save", "mask,soft", "--out", str(out)),
    )
    files = [Path(o["path"]).read_bytes() for o in _rows(out)[SCENES[2].name]["outputs"]]
    response = httpx.post(
        f"{served.url}v1/segment",
        data={"save": "mask,soft", "prompt": "a circle", "mix": "0.5"},
        files=[
            ("image", ("s.png", SCENES[2].read_bytes())),
            ("ref", ("ref.png", photo.read_bytes())),
            ("ref_mask", ("ref-mask.png", mask.read_bytes())),
        ],
        headers=served.headers(),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert [base64.b64decode(o["png_base64"]) for o in response.json()["outputs"]] == files

    out = tmp_path / "embedding"
    _cli("segment", str(SCENES[3]), "--prompt-embedding", str(prompt_file), "--out", str(out))
    row = _rows(out)[SCENES[3].name]
    expected = {(o["prompt"], o["kind"]): Path(o["path"]).read_bytes() for o in row["outputs"]}
    for fields in ({}, {"prompt_file": "shapes"}):  # the first start-up file is the default
        answer = _post(served, fields, SCENES[3].read_bytes()).json()
        assert _outputs(answer) == expected
        assert [p["prompt"] for p in answer["prompts"]] == list(PROMPT_FILE_PROMPTS)


def test_python_client(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    _cli("segment", str(CIRCLES), "-p", "a red circle", "-p", "a blue square", "--out", str(out))
    files = [Path(o["path"]) for o in _rows(out)[CIRCLES.name]["outputs"]]
    expected = np.stack([np.asarray(Image.open(f)) > 127 for f in files])
    with Client(served.url, token=TOKEN) as client:
        assert client.ready()
        masks = client.segment(CIRCLES, ["a red circle", "a blue square"])
        assert masks.dtype == bool and np.array_equal(masks, expected)
        rgb = np.asarray(Image.open(CIRCLES).convert("RGB"))
        assert np.array_equal(client.segment(rgb, ["a red circle", "a blue square"]), expected)
        with pytest.raises(ServerError) as refused:
            client.segment(CIRCLES, ["a red circle"], threshold=7)
        assert refused.value.status == 422 and "threshold" in refused.value.detail
    with Client(served.url, token="wrong") as client, pytest.raises(ServerError) as denied:
        client.segment(CIRCLES, ["a red circle"])
    assert denied.value.status == 401


# -- hostile requests ---------------------------------------------------------------------------


def _raw(served: Served) -> socket.socket:
    parts = urlsplit(served.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def _head(served: Served, length: int | None, boundary: str = "b0undary") -> bytes:
    lines = [
        "POST /v1/segment HTTP/1.1",
        f"Host: {urlsplit(served.url).netloc}",
        f"Authorization: Bearer {TOKEN}",
        f"Content-Type: multipart/form-data; boundary={boundary}",
    ]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer_of(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, json.loads(body)


@functools.cache
def _bomb(side: int = 30000) -> bytes:
    """A real PNG of side x side black 1-bit pixels: ~100 KB that decode to 112 MB (and to
    2.7 GB as RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\0" * (1 + side // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def test_truncated_image_not_an_image_and_a_bomb(served: Served) -> None:
    whole = SCENES[0].read_bytes()
    truncated = _post(served, {"prompt": "a red circle"}, whole[: len(whole) // 2])
    assert truncated.status_code == 422 and "truncated" in truncated.json()["detail"]
    assert_serving(served)
    text = _post(served, {"prompt": "a red circle"}, b"just some text, not an image at all")
    assert text.status_code == 415 and text.json()["error"] == "unsupported image format"
    assert_serving(served)
    bomb = _bomb()
    assert len(bomb) < 200_000
    started = time.perf_counter()
    refused = _post(served, {"prompt": "a red circle"}, bomb)
    assert refused.status_code == 413 and refused.json()["error"] == "image too large"
    assert time.perf_counter() - started < 5  # from the header: nothing was decoded
    assert_serving(served)


def test_a_200_mb_body_is_refused_before_it_is_read(served: Served) -> None:
    # Declared: refused from the header, before a byte of the body.
    with _raw(served) as sock:
        sock.sendall(_head(served, 200_000_000))
        status, body = _answer_of(sock)
    assert status == 413 and body["error"] == "body too large"
    # Not declared (chunked): counted while it streams in; the server answers and closes
    # long before 200 MB have been sent.
    sent = 0
    part = b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    with _raw(served) as sock:
        sock.sendall(_head(served, None) + b"%x\r\n" % len(part) + part + b"\r\n")
        sock.settimeout(10)
        try:
            while sent < 200_000_000:
                sock.sendall(chunk)
                sent += 65536
        except OSError:
            pass  # the server closed the connection: it will not read the rest
        status, body = _answer_of(sock)
    assert status == 413 and body["error"] == "body too large"
    assert sent < 40_000_000, sent
    assert_serving(served)


def test_malformed_multipart_1000_prompts_and_a_10kb_prompt(served: Served) -> None:
    garbage = httpx.post(
        f"{served.url}v1/segment",
        content=b"--nope\r\nthis is not a form\r\n",
        headers={**served.headers(), "Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert garbage.status_code in (400, 422) and set(garbage.json()) == {"error", "detail"}
    assert_serving(served)
    many = _post(served, {"prompt": [f"thing {i}" for i in range(1000)]}, SCENES[0].read_bytes())
    assert many.status_code == 422 and many.json()["error"] == "too many prompts"
    assert_serving(served)
    long = _post(served, {"prompt": "a" * 10_000}, SCENES[0].read_bytes())
    assert long.status_code == 422 and long.json()["error"] == "prompt too long"
    assert_serving(served)


def test_slow_clients_are_dropped(served: Served) -> None:
    # A byte a second of the body: 408 once --read-timeout has passed, and the connection closed.
    body = b"--b0undary\r\n" + b"x" * 100
    with _raw(served) as sock:
        sock.sendall(_head(served, len(body)))
        started = time.monotonic()
        sock.settimeout(0.05)
        answer = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            try:
                answer += sock.recv(65536)
                break
            except TimeoutError:
                time.sleep(0.95)
        sock.settimeout(10)
        while b"\r\n\r\n" not in answer and (more := sock.recv(65536)):
            answer += more
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert READ_TIMEOUT <= waited < READ_TIMEOUT + 3
    assert b"connection: close" in answer.lower()
    assert_serving(served)
    # A byte a second of the headers: the connection is dropped.
    with _raw(served) as sock:
        started = time.monotonic()
        sock.settimeout(0.05)
        closed = False
        for byte in b"POST /v1/segment HTTP/1.1\r\nHost: x\r\n":
            try:
                sock.sendall(bytes([byte]))
                closed = sock.recv(1) == b""
            except TimeoutError:
                time.sleep(0.95)
            except OSError:
                closed = True
            if closed:
                break
    assert closed and time.monotonic() - started < READ_TIMEOUT + 3
    assert_serving(served)


def test_clients_that_leave_cost_nothing_but_their_request(served: Served) -> None:
    before = len(served.log_lines())
    image = SCENES[0].read_bytes()
    form = (
        b'--b0undary\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na red circle\r\n'
        b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="s.png"\r\n\r\n'
        + image
        + b"\r\n--b0undary--\r\n"
    )
    with _raw(served) as sock:  # mid-upload: half the body, then gone
        sock.sendall(_head(served, len(form)) + form[: len(form) // 2])
    with _raw(served) as sock:  # mid-answer: the whole request, then gone before the answer
        sock.sendall(_head(served, len(form)) + form)
    assert wait_until(lambda: len(served.log_lines()) >= before + 2)
    statuses = [line["status"] for line in served.log_lines()[before:]]
    assert 499 in statuses
    assert_serving(served)
    metrics = httpx.get(served.url + "metrics", headers=served.headers()).text
    assert "clipseg_queue_depth 0.0" in metrics  # every slot was given back


def test_bad_token_costs_no_decoding(served: Served) -> None:
    before = len(served.log_lines())
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = httpx.post(
            f"{served.url}v1/segment",
            files={"image": ("bomb.png", _bomb())},
            data={"prompt": "a red circle"},
            headers=headers,
        )
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")

    def refused() -> list[dict]:  # a line is logged just after its answer is sent
        return [line for line in served.log_lines()[before:] if line["status"] == 401]

    assert wait_until(lambda: len(refused()) == 3)
    lines = refused()
    assert all(line["bytes_in"] == 0 for line in lines)  # not a byte of the body was read
    assert httpx.get(served.url + "metrics").status_code == 401
    assert httpx.get(served.url + "healthz").status_code == 200
    assert_serving(served)


def test_readyz_says_which_backend_runs_and_how_it_was_chosen(served: Served) -> None:
    ready = httpx.get(served.url + "readyz").json()
    choice = ready["backend_choice"]  # the CPU backend measured here (or cached), as segment's
    assert choice["choice"] == f"{ready['backend']} {ready['precision']}"
    assert choice["source"] in ("measured", "cache") and len(choice["candidates"]) >= 2
    assert f"backend: {choice['choice']} (the fastest here" in served.log.read_text()


def test_no_field_names_a_path(served: Served) -> None:
    image = SCENES[0].read_bytes()
    for fields in (
        {"prompt": "a red circle", "model": "/etc/passwd"},
        {"prompt": "a red circle", "prompt_embedding": "/etc/passwd"},
        {"prompt": "a red circle", "out_dir": "/tmp/x"},
        {"prompt": "a red circle", "ref": "/etc/passwd"},
        {"prompt_file": "../../etc/passwd"},
        {"prompt": "a red circle", "sam_model": "/tmp/sam"},
    ):
        response = _post(served, fields, image)
        assert response.status_code == 422, (fields, response.text)
        assert set(response.json()) == {"error", "detail"}
    composite = _post(
        served, {"prompt": "a red circle", "background": "/etc/hostname"}, image, "matte"
    )
    assert composite.status_code == 422 and "background" in composite.json()["detail"]
    assert_serving(served)


def test_overload_gets_503_at_once_and_the_accepted_succeed(served: Served) -> None:
    scene = make_scene(5, size=768).image
    buffer = io.BytesIO()
    Image.fromarray(scene).save(buffer, format="JPEG", quality=90)
    image = buffer.getvalue()
    before = len(served.log_lines())
    start = threading.Barrier(64)

    def client(_index: int) -> tuple[int, str | None, float]:
        start.wait()
        began = time.perf_counter()
        response = _post(served, {"prompt": "a red circle"}, image, name="s.jpg")
        return (
            response.status_code,
            response.headers.get("retry-after"),
            time.perf_counter() - began,
        )

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(client, range(64)))
    statuses = [status for status, _retry, _seconds in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 8 and statuses.count(200) >= 8, statuses
    assert all(retry is not None and int(retry) >= 1 for s, retry, _ in results if s == 503)

    def refused() -> list[dict]:  # a line is logged just after its answer is sent
        return [line for line in served.log_lines()[before:] if line["status"] == 503]

    assert wait_until(lambda: len(refused()) == statuses.count(503))
    # At once: before a byte of the body was read, the typical refusal in well under 10 ms
    # (0.3 ms measured), none hanging. The 100 ms for every refusal is measured by
    # bench/serve_bench.py, clients in another process: here 64 client threads share 2 cores
    # with the server, and the kernel may run a client between the server's two writes of one
    # answer (133 ms seen once in CI), which says nothing about the server.
    assert all(line["bytes_in"] == 0 for line in refused()), refused()
    seconds = sorted(line["seconds"] for line in refused())
    assert seconds[len(seconds) // 2] < 0.01 and seconds[-1] < 1.0, seconds
    assert_serving(served)


# -- the page -----------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


def test_the_page_in_chromium(served: Served, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    scene = CIRCLES
    circle = next(o.mask for o in make_scene(CIRCLES_SEED).objects if o.label == "red circle")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(served.url)
            page.wait_for_selector("body[data-ready=true]")
            page.set_input_files("#file", str(scene))
            page.fill("#prompts", "a red circle\na yellow square")
            page.click("#go")
            page.wait_for_selector("#token-dialog[open]")  # the server asked for its token
            page.fill("#token", TOKEN)
            page.click("#token-ok")
            page.wait_for_selector("body[data-state=done]", timeout=30_000)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            pixels = page.evaluate(
                """() => { const c = document.getElementById('overlay');
                const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height);
                return Array.from(pixels.data); }"""
            )
            labels = page.eval_on_selector_all(
                "#prompt-list li", "els => els.map(e => e.dataset.prompt)"
            )
            page.click("#prompt-list li:first-child input[type=checkbox]")
            hidden = page.evaluate("() => document.body.dataset.shown")
        finally:
            browser.close()
    assert labels == ["a red circle", "a yellow square"]
    overlay = np.array(pixels, np.uint8).reshape(224, 224, 4)[:, :, :3].astype(int)
    original = np.asarray(Image.open(scene).convert("RGB")).astype(int)
    tinted = np.abs(overlay - original).sum(axis=2) > 40
    iou = (tinted & circle).sum() / (tinted | circle).sum()
    assert iou > 0.5, iou  # the overlay shows the red circle where it is
    assert hidden == "1"  # toggling a prompt off leaves one shown
    shot = Image.open(tmp_path / "page.png")
    assert shot.size[0] == 1100 and len(shot.convert("RGB").getcolors(1 << 20) or range(99)) > 50
