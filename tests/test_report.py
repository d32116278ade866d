"""Tests of the HTML review page (clipseg_cli.io.report): log resolution, thumbnails, links,
escaping, and a real headless Chromium run over a report of a real (tiny-model) CLI run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.io.report import REPORT_NAME, THUMBNAIL_DIR, load_entries, write_report
from clipseg_cli.run.inputs import failure_row

HOSTILE = "<img src=x onerror=alert(1)>"
CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "install it with: apt-get update && apt-get install -y chromium"


# -- helpers ----------------------------------------------------------------------------------


def _write_log(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _ok(key: str, run: str, outputs: list[dict], **stats: float) -> dict:
    """An ok row for one prompt "a dog" with the given coverage/max."""
    coverage = stats.get("coverage", 0.5)
    return {
        "input": f"photos/{key}",
        "key": key,
        "status": "ok",
        "error": None,
        "width": 64,
        "height": 48,
        "prompts": [
            {
                "prompt": "a dog",
                "max": stats.get("max", 0.9),
                "mean": 0.3,
                "coverage": coverage,
                "empty": coverage == 0,
            }
        ],
        "outputs": outputs,
        "timings": {},
        "run": run,
    }


def _failed(key: str | None, run: str, error: str, status: str = "failed") -> dict:
    path = f"photos/{key}" if key else "photos/missing-*.png"
    return {**failure_row(path, key, error, status), "run": run}


def _embedded(report: Path) -> dict:
    text = report.read_text(encoding="utf-8")
    match = re.search(
        r'<script id="report-data" type="application/json">(.*?)</script>', text, re.S
    )
    assert match, "no embedded data block"
    return json.loads(match.group(1))


def _image(path: Path, size: tuple[int, int] = (64, 48), color=(30, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    data = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    data[: size[1] // 2] = color
    Image.fromarray(data).save(path)
    return path


# -- reading the log --------------------------------------------------------------------------


def test_latest_row_wins_and_skipped_rows_use_the_earlier_result(tmp_path: Path) -> None:
    log = _write_log(
        tmp_path / "log.jsonl",
        [
            _ok("a.png", "r1", [], coverage=0.2),
            _failed("b.png", "r1", "truncated"),
            _failed(None, "r1", "no such file or no match"),  # input-level: latest run only
            _ok("d.png", "r1", [], coverage=0.7),
            _ok("a.png", "r2", [], coverage=0.5),  # a rerun's row replaces the first
            {**_failed("b.png", "r2", None, "skipped"), "reason": "unchanged"},
            {**_failed("c.png", "r2", None, "skipped"), "reason": "unchanged"},  # no history
            {**_failed("d.png", "r2", None, "skipped")},
        ],
    )
    (tmp_path / "log.jsonl").open("a").write('{"key": "half a li')  # a killed writer's tail
    entries = load_entries(log)
    rows = {row["key"]: row for row in entries.rows}
    assert set(rows) == {"a.png", "b.png", "c.png", "d.png"}
    assert entries.latest_run == "r2" and entries.bad_lines == 1
    assert rows["a.png"]["prompts"][0]["coverage"] == 0.5 and not rows["a.png"].get("resumed")
    # Skipped = unchanged: the earlier result (ok or failed) is what the page shows.
    assert rows["d.png"]["status"] == "ok" and rows["d.png"]["resumed"] is True
    assert rows["d.png"]["prompts"][0]["coverage"] == 0.7 and rows["d.png"]["skipped_in"] == "r2"
    assert rows["b.png"]["status"] == "failed" and rows["b.png"]["error"] == "truncated"
    assert rows["c.png"]["status"] == "skipped"


# -- the written report -----------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder shaped like a run with relative paths in the log: photos/ and out/."""
    monkeypatch.chdir(tmp_path)
    outputs = []
    for key in ("a.png", "sub/b.png"):
        _image(tmp_path / "photos" / key, size=(800, 600))
        overlay = Path("out") / f"{key}.a-dog.overlay.png"
        _image(tmp_path / overlay, size=(800, 600), color=(255, 0, 80))
        outputs.append((key, [{"prompt": "a dog", "kind": "overlay", "path": str(overlay)}]))
    _write_log(
        tmp_path / "out" / "clipseg-log.jsonl",
        [_ok(key, "r1", outs, coverage=0.1 * (i + 1)) for i, (key, outs) in enumerate(outputs)]
        + [_failed("broken.png", "r1", "not an image")],
    )
    return tmp_path


def test_report_links_are_relative_and_thumbnails_small(run_dir: Path) -> None:
    report = write_report(Path("out"), Path("out/clipseg-log.jsonl"))
    assert report == (run_dir / "out" / REPORT_NAME).absolute()
    data = _embedded(report)
    assert [item["key"] for item in data["items"]] == ["a.png", "broken.png", "sub/b.png"]
    hrefs = []
    for item in data["items"]:
        for prompt in item["prompts"]:
            hrefs += [prompt["thumb"]] + [v["href"] for v in prompt["views"]]
            hrefs += [link["href"] for link in prompt["links"]]
    assert hrefs
    for href in hrefs:
        assert not href.startswith(("/", "file:")) and "://" not in href, href
        assert (report.parent / unquote(href)).is_file(), href
    thumbs = sorted((report.parent / THUMBNAIL_DIR).iterdir())
    assert len(thumbs) == 2
    for thumb in thumbs:
        with Image.open(thumb) as image:
            assert image.format == "JPEG" and max(image.size) == 256
        assert thumb.stat().st_size < 40_000
    # Atomic writes leave no temp files; nothing else appears next to the outputs.
    leftovers = [p for p in report.parent.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_page_is_built_from_the_package_asset_files(run_dir: Path) -> None:
    from importlib import resources

    page = write_report(Path("out"), Path("out/clipseg-log.jsonl")).read_text(encoding="utf-8")
    assets = resources.files("clipseg_cli.io.report")
    for name in ("report.css", "report.js"):
        text = assets.joinpath(name).read_text(encoding="utf-8")
        assert text.strip() and text in page, name
    nonce = re.search(r'<script nonce="([A-Za-z0-9_-]+)">', page)
    assert nonce and page.count(nonce.group(1)) == 4  # CSP twice, style and script once each
    assert "@" + "DATA@" not in page and "@" + "JS@" not in page


def test_report_survives_moving_the_folder_and_reuses_thumbnails(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_report(Path("out"), Path("out/clipseg-log.jsonl"))
    thumb_dir = run_dir / "out" / THUMBNAIL_DIR
    stale = thumb_dir / ("0" * 20 + ".jpg")
    stale.write_bytes(b"old")
    mine = thumb_dir / "notes.txt"  # not a name the report makes: left alone
    mine.write_text("keep")
    # The log says "out/a.png...", relative to a directory that no longer applies.
    moved = run_dir / "elsewhere" / "review"
    shutil.copytree(run_dir / "out", moved)
    monkeypatch.chdir(run_dir / "elsewhere")
    before = {p.name: p.stat().st_mtime_ns for p in (moved / THUMBNAIL_DIR).glob("*.jpg")}
    time.sleep(0.01)
    report = write_report(moved, moved / "clipseg-log.jsonl")
    data = _embedded(report)
    thumbs = [p["thumb"] for item in data["items"] for p in item["prompts"]]
    assert len(thumbs) == 2 and all(t and (moved / unquote(t)).is_file() for t in thumbs)
    after = {p.name: p.stat().st_mtime_ns for p in (moved / THUMBNAIL_DIR).glob("*.jpg")}
    assert stale.name not in after and (moved / THUMBNAIL_DIR / "notes.txt").exists()
    assert all(after[name] == before[name] for name in after)  # reused, not re-encoded


def test_hostile_names_prompts_and_errors_are_escaped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # A non-UTF-8 file name, as the CLI logs it (display_path escapes the byte as \xe9).
    raw_name = os.fsdecode(b"caf\xe9.png")
    overlay = out / f"{raw_name}.a-dog.overlay.png"
    _image(overlay)
    shown = str(out / "caf\\xe9.png.a-dog.overlay.png")
    error = '</script><script>alert("x")</script> & <!-- \u2028'
    row = _ok(HOSTILE, "r1", [{"prompt": HOSTILE, "kind": "overlay", "path": shown}])
    row["prompts"][0]["prompt"] = HOSTILE
    rows = [row, _failed(f"{HOSTILE}.jpg", "r1", error), _ok("caf\\xe9.png", "r1", [])]
    rows[2]["outputs"] = [{"prompt": "a dog", "kind": "overlay", "path": shown}]
    _write_log(out / "clipseg-log.jsonl", rows)
    report = write_report(out, out / "clipseg-log.jsonl", title=f"{HOSTILE} \udcff")
    text = report.read_text(encoding="utf-8")
    assert "<img src=x" not in text and "</script><script>" not in text
    assert text.count("</script>") == 2  # the data block's and the code's own
    assert "&lt;img src=x onerror=alert(1)&gt;" in text  # the title, HTML-escaped
    data = _embedded(report)
    by_key = {item["key"]: item for item in data["items"]}
    assert by_key[HOSTILE]["prompts"][0]["prompt"] == HOSTILE
    assert by_key[f"{HOSTILE}.jpg"]["error"] == error
    assert data["prompts"] == [HOSTILE, "a dog"] or data["prompts"] == ["a dog", HOSTILE]
    # The undecodable byte reaches the browser as %E9, which is how it asks for that file.
    href = by_key["caf\\xe9.png"]["prompts"][0]["views"][0]["href"]
    assert href == quote(b"caf\xe9.png.a-dog.overlay.png")
    assert by_key["caf\\xe9.png"]["prompts"][0]["thumb"]


def test_without_overlays_the_thumbnail_is_the_input_tinted_by_the_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _image(tmp_path / "photos" / "a.png", size=(100, 80), color=(0, 0, 0))
    mask = np.zeros((80, 100), np.uint8)
    mask[:, 50:] = 255  # right half is foreground
    (tmp_path / "out").mkdir()
    Image.fromarray(mask).save(tmp_path / "out" / "a.png.a-dog.mask.png")
    outputs = [{"prompt": "a dog", "kind": "mask", "path": "out/a.png.a-dog.mask.png"}]
    _write_log(tmp_path / "out" / "clipseg-log.jsonl", [_ok("a.png", "r1", outputs)])
    report = write_report(Path("out"), Path("out/clipseg-log.jsonl"), thumbnail_size=50)
    (item,) = _embedded(report)["items"]
    prompt = item["prompts"][0]
    assert [view["kind"] for view in prompt["views"]] == ["mask", "input"]
    with Image.open(report.parent / unquote(prompt["thumb"])) as thumb:
        pixels = np.asarray(thumb.convert("RGB")).astype(int)
    assert thumb.size == (50, 40)
    # Top half of the input is black: tinted on the right, untouched on the left.
    assert pixels[5, 40:].mean(axis=0)[0] > 90 and pixels[5, :10].max() < 40


def test_report_reads_the_runs_summary_and_module_stays_light(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipseg_cli.run import config

    # The page's header reads the summary where a run writes it.
    monkeypatch.chdir(tmp_path)
    log = _write_log(tmp_path / "out" / "clipseg-log.jsonl", [_ok("a.png", "r1", [])])
    summary = {"run": "r1", "command": "segment", "seconds": 2.5, "counts": {"ok": 1}}
    (tmp_path / "out" / config.SUMMARY_NAME).write_text(json.dumps(summary), encoding="utf-8")
    shown = _embedded(write_report(Path("out"), log))["summary"]
    assert shown == {**summary, "interrupted": False}
    code = (
        "import sys, clipseg_cli.io.report; "
        "bad = {'torch', 'numpy', 'cv2'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- headless Chromium over a real run --------------------------------------------------------


class _Cards(HTMLParser):
    """Collects ``li.card`` attributes (and their ``img``) from a dumped DOM, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.body: dict = {}
        self.images: list[dict] = []
        self._open = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "body":
            self.body = values
        elif tag == "li" and "card" in values.get("class", "").split():
            self.cards.append(values)
            self._open = True
        elif tag == "img":
            self.images.append(values)
            if self._open:
                self.cards[-1]["img"] = values

    def handle_endtag(self, tag: str) -> None:
        if tag == "li":
            self._open = False


def _chromium_flags(profile: Path) -> list[str]:
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root in a container
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        # Lets lazy work (image decoding, hashchange) finish before the dump or screenshot.
        "--virtual-time-budget=2000",
        "--window-size=1200,900",
    ]


def _dump(profile: Path, report: Path, fragment: str = "") -> _Cards:
    url = report.as_uri() + (f"#{fragment}" if fragment else "")
    done = subprocess.run(
        [*_chromium_flags(profile), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cards = _Cards()
    cards.feed(done.stdout)
    assert cards.body.get("data-ready") == "true", f"page script did not run for #{fragment}"
    return cards


def _keys(cards: _Cards) -> list[str]:
    return [card["data-key"] for card in cards.cards]


# Stats of a random tiny model are arbitrary; these pin them (files stay the CLI's real ones)
# so every filter and sort below has one exact expected answer.
PINNED = {  # key: {prompt: (coverage, max)}; coverage 0 means empty
    "a.png": {"a dog": (0.60, 0.90), HOSTILE: (0.00, 0.20)},
    "b.jpg": {"a dog": (0.10, 0.50), HOSTILE: (0.30, 0.70)},
    "sub/c.png": {"a dog": (0.00, 0.30), HOSTILE: (0.80, 0.95)},
    "d.png": {"a dog": (0.35, 0.60), HOSTILE: (0.05, 0.40)},
}


def test_report_in_headless_chromium(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing; this test needs Debian's chromium: {INSTALL_HINT}")
    from clipseg_cli.commands.app import app
    from clipseg_cli.commands.console import ExitCode

    monkeypatch.chdir(tmp_path)
    for name in PINNED:
        _image(tmp_path / "photos" / name, size=(96, 72))
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png at all")
    result = CliRunner().invoke(
        app,
        [
            *("segment", "photos", "--prompt", "a dog", "--prompt", HOSTILE, "--out", "out"),
            *("--save", "mask,overlay", "--model", str(tiny_model_dir), "--device", "cpu"),
            *("--progress", "none"),
        ],
    )
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    log = Path("out") / "clipseg-log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert {row["key"]: row["status"] for row in rows} == {
        **dict.fromkeys(PINNED, "ok"),
        "broken.png": "failed",
    }
    for row in rows:
        for stats in row["prompts"]:
            stats["coverage"], stats["max"] = PINNED[row["key"]][stats["prompt"]]
            stats["empty"] = stats["coverage"] == 0
    _write_log(log, rows)

    report = write_report(Path("out"), log, title=f"Review {HOSTILE}")
    profile = tmp_path / "chromium-profile"
    started = time.perf_counter()

    everything = _dump(profile, report)
    assert _keys(everything) == ["a.png", "b.jpg", "broken.png", "d.png", "sub/c.png"]
    with_thumbs = [card for card in everything.cards if card.get("data-thumb") == "true"]
    assert len(with_thumbs) == 4
    for card in with_thumbs:  # loaded from disk, through the relative links
        assert card.get("data-loaded") == "true" and "data-broken" not in card, card
        assert card["img"]["src"].startswith(".clipseg/report/"), card
    assert not any("data-broken" in card for card in everything.cards)
    # The hostile prompt is text, never markup: no <img src="x"> appeared.
    assert not any(image.get("src") == "x" for image in everything.images)

    assert _keys(_dump(profile, report, "status=failed")) == ["broken.png"]
    assert _keys(_dump(profile, report, "status=empty")) == ["a.png", "sub/c.png"]
    dog, evil = quote("a dog"), quote(HOSTILE, safe="")
    assert _keys(_dump(profile, report, f"status=empty&prompt={dog}")) == ["sub/c.png"]
    evil_empty = _dump(profile, report, f"status=empty&prompt={evil}")
    assert _keys(evil_empty) == ["a.png"] and evil_empty.cards[0]["data-prompt"] == HOSTILE

    by_dog = _dump(profile, report, f"prompt={dog}&sort=coverage-desc")
    assert _keys(by_dog) == ["a.png", "d.png", "b.jpg", "sub/c.png", "broken.png"]
    by_evil = _dump(profile, report, f"prompt={evil}&sort=coverage-desc")
    assert _keys(by_evil) == ["sub/c.png", "b.jpg", "d.png", "a.png", "broken.png"]
    # Each prompt shows its own overlay thumbnails.
    dog_src = {c["data-key"]: c["img"]["src"] for c in by_dog.cards if "img" in c}
    evil_src = {c["data-key"]: c["img"]["src"] for c in by_evil.cards if "img" in c}
    assert dog_src.keys() == evil_src.keys() and all(dog_src[k] != evil_src[k] for k in dog_src)
    # All prompts: an image ranks by its best prompt (max .90/.70/.95/.60; failures last).
    by_max = _dump(profile, report, "sort=max-asc")
    assert _keys(by_max) == ["d.png", "b.jpg", "a.png", "sub/c.png", "broken.png"]

    shot = tmp_path / "report.png"
    done = subprocess.run(
        [*_chromium_flags(profile), f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "the screenshot is (nearly) blank"
    # Kept short: the whole Chromium part should stay well under the test file's budget.
    assert time.perf_counter() - started < 40
