"""``clipseg serve --engine ray``: the same app as a Ray Serve deployment on a local Ray started
for the test (by the command itself), answering the same bytes as ``clipseg segment``, with
concurrent requests gathered by ``@serve.batch``."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import start_server, wait_until
from test_serve import OPTION_SETS, SCENES, _cli, _rows

pytest.importorskip("ray.serve")


def test_ray_serve_answers_the_cli_bytes(tmp_path: Path) -> None:
    sets = [OPTION_SETS[0], OPTION_SETS[2], OPTION_SETS[4]]  # segment, shaping + labels, matte
    expected = []
    for index, (route, _fields, cli_args) in enumerate(sets):
        out = tmp_path / f"cli-{index}"
        _cli(route, *map(str, SCENES), *cli_args, "--out", str(out))
        expected.append(_rows(out))
    token = "ray-token-" + "y" * 24
    server = start_server(
        ["--engine", "ray", "--replicas", "1", "--model", "demo", "--device", "cpu"],
        tmp_path / "server.log",
        token,
        wait=300,
    )
    try:
        headers = {"Authorization": f"Bearer {token}"}
        assert wait_until(lambda: httpx.get(server.url + "readyz").status_code == 200, 60)
        jobs = [(index, scene) for index in range(len(sets)) for scene in SCENES]

        def ask(job):
            index, scene = job
            route, fields, _cli_args = sets[index]
            return httpx.post(
                f"{server.url}v1/{route}",
                data=fields,
                files={"image": (scene.name, scene.read_bytes())},
                headers=headers,
                timeout=120,
            )

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(ask, jobs))
        sizes = []
        for (index, scene), response in zip(jobs, responses, strict=True):
            assert response.status_code == 200, response.text
            answer = response.json()
            row = expected[index][scene.name]
            files = {(o["prompt"], o["kind"]): Path(o["path"]).read_bytes() for o in row["outputs"]}
            got = {
                (o["prompt"], o["kind"]): base64.b64decode(o["png_base64"])
                for o in answer["outputs"]
            }
            assert got == files, (index, scene.name)
            assert answer["prompts"] == row["prompts"]
            sizes.append(answer["batch_size"])
        assert max(sizes) > 1, sizes  # @serve.batch gathered requests into shared calls
        refused = httpx.post(f"{server.url}v1/segment", data={"prompt": "x"})
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    finally:
        server.stop()
