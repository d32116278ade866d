"""Behaviour check across a change: the same fixed runs with two versions of clipseg, compared.

    python scripts/compare_runs.py --base <git rev> [--new <git rev>] [--ray]

Each side is the package as committed at a revision (``git archive``), or this working tree
when ``--new`` is left out. Both run the same commands, in the same folder, on the same inputs:
mixed formats and modes (JPEG, PNG with alpha, 16-bit, palette GIF, CMYK TIFF, WebP, a rotated
JPEG, broken files), the bundled demo model, several prompts with a negative, every ``--save``
kind of ``segment`` and ``matte``, an image prompt mixed with text, saved and reused prompt
embeddings, labels, the review page, a resumed rerun and ``eval``. Then every output file is
compared byte for byte, and the log, ledger, summary, eval JSON and report page row by row with
only what must differ between two runs taken out (timings, run ids, dates, the page's nonce,
where each side's package lives).

``--new-args`` adds options to every ``segment``/``matte`` command of the new side only (to show
that new options at their neutral values reproduce the old outputs). ``--pixels`` compares PNGs
by decoded pixels when their bytes differ (for a change of encoder that keeps the pixels).

Exit status 0 when both sides agree, 1 with a list of differences otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square", "a yellow triangle"]
# Keys whose values differ between any two runs, whatever the code.
VOLATILE_KEYS = {
    "run",
    "seconds",
    "inference_seconds",
    "images_per_second",
    "timings",
    "created",
    "time",
    "generated",
    "decode_s",
    "write_s",
    "versions",
    "stale_temporaries_removed",
    "latestRun",
}


def make_inputs(folder: Path) -> None:
    """Deterministic inputs: the bundled shape scenes in several encodings, plus broken files."""
    scenes = sorted((REPO / "sample_data").glob("shapes-*.png"))
    folder.mkdir(parents=True)
    (folder / "nested" / "deeper").mkdir(parents=True)
    rgb = [np.asarray(Image.open(path).convert("RGB")) for path in scenes]
    Image.fromarray(rgb[0]).save(folder / "scene0.jpg", quality=92)
    Image.fromarray(rgb[0]).save(folder / "scene0.png")  # same stem, other extension
    alpha = np.full(rgb[1].shape[:2], 255, np.uint8)
    alpha[: alpha.shape[0] // 3] = 0
    Image.fromarray(np.dstack([rgb[1], alpha])).save(folder / "nested" / "scene1-rgba.png")
    grey16 = (rgb[2].mean(axis=2) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "nested" / "scene2-16bit.png")
    Image.fromarray(rgb[3]).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "nested" / "deeper" / "scene3.gif"
    )
    Image.fromarray(rgb[1]).convert("CMYK").save(folder / "scene1-cmyk.tif")
    Image.fromarray(rgb[2]).save(folder / "scene2.webp", lossless=True)
    rotated = Image.fromarray(rgb[3])
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    rotated.save(folder / "scene3-rotated.jpg", exif=exif, quality=92)
    big = Image.fromarray(rgb[0]).resize((1024, 768), Image.Resampling.BICUBIC)
    big.save(folder / "scene0-large.jpg", quality=90)
    (folder / "empty.png").write_bytes(b"")
    (folder / "not-an-image.jpg").write_bytes(b"this is text, not a JPEG\n" * 4)
    data = (folder / "scene0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])


def make_ground_truth(folder: Path, data: Path) -> None:
    """Masks for eval: the red channel's bright parts of each scene, one folder per prompt."""
    for name in ("scene0.png", "scene0.jpg", "scene2.webp"):
        rgb = np.asarray(Image.open(data / name).convert("RGB")).astype(int)
        mask = (rgb[..., 0] > 150) & (rgb[..., 1] < 100)
        target = folder / "a-red-circle" / Path(name).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((mask * 255).astype(np.uint8)).save(target)


def commands(new_args: list[str], segment_args: list[str]) -> list[list[str]]:
    """The fixed runs (cwd: the work folder; inputs under data/, outputs under out/)."""
    prompt_args = [arg for prompt in PROMPTS for arg in ("-p", prompt)]
    common = ["--model", "demo", "--progress", "none"]
    return [
        ["segment", "data", *prompt_args, "--negative", "a green circle", "--save",
         "mask,soft,overlay,cutout,logits,labels", "--soft-bits", "16", "--report",
         "--out", "out/segment", *common, *new_args, *segment_args],
        # The same again: every input is skipped (unchanged), the log gains skipped rows.
        ["segment", "data", *prompt_args, "--negative", "a green circle", "--save",
         "mask,soft,overlay,cutout,logits,labels", "--soft-bits", "16", "--report",
         "--out", "out/segment", *common, *new_args, *segment_args],
        ["segment", "data/scene0.png", "data/nested", "-p", "a red circle", "--ref",
         "data/scene2.webp", "--mix", "0.5", "--save", "mask,cutout", "--cutout-alpha", "mask",
         "--threshold", "0.4", "--save-prompt", "out/prompts.safetensors",
         "--out", "out/ref", *common, *new_args, *segment_args],
        ["segment", "data/scene0.png", "data/nested", "--prompt-embedding",
         "out/prompts.safetensors", "--save", "mask,overlay", "--out", "out/reuse", *common,
         *new_args, *segment_args],
        ["matte", "data", "-p", "a blue square", "--save", "matte,cutout,composite",
         "--background", "blur", "--out", "out/matte", *common, *new_args],
        ["matte", "data", "-p", "a blue square", "-p", "a red circle", "--refine", "none",
         "--matte-bits", "16", "--background", "#00ff00", "--save", "matte,composite",
         "--out", "out/matte-none", *common, *new_args],
        ["eval", "--pred", "out/segment", "--gt", "gt", "--pred-slug", "a-red-circle",
         "--json", "out/eval.json"],
    ]  # fmt: skip


def extract(rev: str, into: Path) -> Path:
    """The package and its data as committed at ``rev``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "clipseg_cli"],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True)
    archive_path = into / "src.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(into, filter="data")
    archive_path.unlink()
    return into


def run_side(
    source: Path, work: Path, new_args: list[str], segment_args: list[str], ray: bool
) -> list[dict]:
    """Run every command with the package at ``source``; returns exit codes and stderr."""
    env = dict(os.environ, PYTHONPATH=str(source), HF_HUB_OFFLINE="1", COLUMNS="200")
    check = subprocess.run(
        [sys.executable, "-P", "-c", "import clipseg_cli; print(clipseg_cli.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not check.startswith(str(source)):
        raise SystemExit(f"clipseg_cli imported from {check}, not from {source}")
    results = []
    runs = commands(new_args, segment_args)
    if ray:
        first = runs[0]
        out = first.index("--out")
        runs.append([*first[:out], "--out", "out/ray", *first[out + 2 :], "--engine", "ray"])
    for argv in runs:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "clipseg_cli", *argv],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        stderr = re.sub(r"\d+(\.\d+)?\s*(s|img/s)\b", "<t>", done.stderr)
        results.append({"argv": argv, "code": done.returncode, "stderr": stderr})
    return results


def _strip(value: object, roots: list[str]) -> object:
    if isinstance(value, dict):
        return {k: _strip(v, roots) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<SRC>")
        return value
    return value


def _jsonl(path: Path, roots: list[str]) -> list:
    return [_strip(json.loads(line), roots) for line in path.read_text().splitlines()]


_PAGE_DATA = re.compile(
    r'(<script id="report-data" type="application/json">)(.*?)(</script>)', re.S
)


def _page(path: Path, roots: list[str]) -> tuple[str, object]:
    """The page's markup (nonces blanked) and its embedded data (volatile keys removed)."""
    text = path.read_text()
    text = re.sub(r"nonce-[A-Za-z0-9_-]+|nonce=\"[A-Za-z0-9_-]+\"", "<nonce>", text)
    match = _PAGE_DATA.search(text)
    data = _strip(json.loads(match.group(2)), roots) if match else None
    return _PAGE_DATA.sub(r"\1\3", text), data


def _safetensors(path: Path) -> tuple:
    """Header (metadata order is not stable between identical writes) and tensor bytes."""
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    return sorted((k, json.dumps(v, sort_keys=True)) for k, v in header.items()), blob[8 + length :]


def _ledger(path: Path, roots: list[str]) -> list:
    """Ledger rows; a header that names a --prompt-embedding file carries that file's sha256,
    and that file's bytes differ between identical runs (see _safetensors): both are left out
    there, the file itself is compared by content."""
    rows = _jsonl(path, roots)
    for row in rows:
        parts = row.get("parts") or {}
        if parts.get("prompt_embedding"):
            parts["prompt_embedding"] = "<sha256 of the prompt file>"
            row.pop("fingerprint", None)
    return rows


def _same(base: object, new: object, allow_new: bool) -> bool:
    """Equal, or (with ``allow_new``) equal but for dictionary keys only the new side has."""
    if isinstance(base, dict) and isinstance(new, dict):
        if not allow_new and base.keys() != new.keys():
            return False
        return base.keys() <= new.keys() and all(
            _same(base[key], new[key], allow_new) for key in base
        )
    if isinstance(base, list) and isinstance(new, list):
        return len(base) == len(new) and all(
            _same(a, b, allow_new) for a, b in zip(base, new, strict=True)
        )
    return base == new


def _header_changes(base: list, new: list) -> list[str]:
    """How the ledgers' configuration headers differ (new options change the fingerprint)."""
    old = next((row for row in base if "parts" in row), {}).get("parts", {})
    now = next((row for row in new if "parts" in row), {}).get("parts", {})
    return [f"{key}: {old.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(old) | set(now))
            if old.get(key) != now.get(key)]  # fmt: skip


def _pixels(path: Path) -> tuple:
    with Image.open(path) as image:
        return image.mode, image.size, hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def compare(
    old: Path, new: Path, roots: list[str], pixels: bool, allow_new: bool = False
) -> list[str]:
    problems = []
    old_files = {p.relative_to(old) for p in old.rglob("*") if p.is_file()}
    new_files = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    for missing in sorted(old_files - new_files):
        problems.append(f"only in the base run: {missing}")
    for extra in sorted(new_files - old_files):
        problems.append(f"only in the new run: {extra}")
    decoded_same = 0
    for rel in sorted(old_files & new_files):
        a, b = old / rel, new / rel
        name = rel.name
        if name == "ledger.jsonl":
            base_rows, new_rows = _ledger(a, roots), _ledger(b, roots)
            if allow_new and (changes := _header_changes(base_rows, new_rows)):
                # The configuration gained options: the header's parts (and its hash) change,
                # every input's row must not.
                print(f"configuration header of {rel} changed: {'; '.join(changes)}")
                base_rows = [row for row in base_rows if "parts" not in row]
                new_rows = [row for row in new_rows if "parts" not in row]
            if not _same(base_rows, new_rows, allow_new):
                problems.append(f"ledger rows differ: {rel}")
        elif name.endswith(".jsonl"):
            if not _same(_jsonl(a, roots), _jsonl(b, roots), allow_new):
                problems.append(f"rows differ: {rel}")
        elif name.endswith(".json"):
            base_json = _strip(json.loads(a.read_text()), roots)
            if not _same(base_json, _strip(json.loads(b.read_text()), roots), allow_new):
                problems.append(f"JSON differs: {rel}")
        elif name.endswith(".safetensors"):
            if _safetensors(a) != _safetensors(b):
                problems.append(f"tensors or metadata differ: {rel}")
        elif name == "report.html":
            (base_markup, base_data), (new_markup, new_data) = _page(a, roots), _page(b, roots)
            if base_markup != new_markup or not _same(base_data, new_data, allow_new):
                problems.append(f"page differs: {rel}")
        elif name == "lock" or re.match(r"ledger\.jsonl\.\d+\.old", name):
            continue
        elif a.read_bytes() != b.read_bytes():
            if pixels and name.endswith(".png") and _pixels(a) == _pixels(b):
                decoded_same += 1
                continue
            problems.append(f"bytes differ: {rel}")
    if decoded_same:
        print(f"{decoded_same} PNGs differ in bytes but decode to the same pixels and mode")
    print(f"compared {len(old_files & new_files)} files")
    return problems


def _describe(argv: list[str]) -> str:
    where = argv[argv.index("--out") + 1] if "--out" in argv else argv[-1]
    return f"clipseg {argv[0]} ... {where}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision of the reference side")
    parser.add_argument("--new", help="git revision of the new side (default: working tree)")
    parser.add_argument("--new-args", default="", help="extra options for the new side")
    parser.add_argument(
        "--segment-args", default="", help="extra options for the new side's segment runs only"
    )
    parser.add_argument(
        "--allow-new-keys",
        action="store_true",
        help="JSON and rows may gain keys the base side lacks (new options, new metrics)",
    )
    parser.add_argument("--pixels", action="store_true", help="compare PNG pixels, not bytes")
    parser.add_argument("--ray", action="store_true", help="also run --engine ray")
    parser.add_argument("--keep", type=Path, help="keep the work folder here")
    args = parser.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clipseg-compare-"))
    if work.exists() and args.keep:
        shutil.rmtree(work)
    run_dir = work / "run"
    make_inputs(run_dir / "data")
    make_ground_truth(run_dir / "gt", run_dir / "data")
    old_src = extract(args.base, work / "base-src")
    new_src = extract(args.new, work / "new-src") if args.new else REPO
    roots = [str(old_src), str(new_src)]
    sides = {}
    for label, source, extra, segment_extra in (
        ("base", old_src, [], []),
        ("new", new_src, args.new_args.split(), args.segment_args.split()),
    ):
        print(f"running the {label} side from {source}")
        results = run_side(source, run_dir, extra, segment_extra, args.ray)
        (run_dir / "out").rename(work / f"{label}-out")
        sides[label] = results
    problems = []
    for a, b in zip(sides["base"], sides["new"], strict=True):
        what = _describe(a["argv"])
        if a["code"] != b["code"]:
            problems.append(f"{what}: exit {a['code']} vs {b['code']}")
        if a["stderr"] != b["stderr"]:
            # Messages may change on purpose (a fixed message); shown for a person to judge.
            base, new = a["stderr"].strip(), b["stderr"].strip()
            print(f"messages differ, {what}:\n  base: {base}\n  new:  {new}")
    problems += compare(
        work / "base-out", work / "new-out", roots, args.pixels, args.allow_new_keys
    )
    for result in sides["new"]:
        print(f"exit {result['code']}: clipseg {' '.join(result['argv'])}")
    if problems:
        print("DIFFERENCES:\n" + "\n".join(problems))
        return 1
    print(f"identical: outputs, log rows, ledgers, summaries, eval and report ({work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
