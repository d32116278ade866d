"""Does the composition of a model batch change any byte of an image's outputs?

The server gathers concurrent requests into one model call, and its answers must equal the files
``clipseg segment`` writes. This measures, for the backend a run chooses (``--backend auto``,
through the run's own functions), whether one image's logits and PNGs depend on:

- the batch size (``pad_to`` of :func:`clipseg_cli.run.items.predict_batch`): 1 vs 2, 4, 8;
- its companions in a batch of the same size, and its row in the batch;
- the other prompts of the model call (``conditionals [K, D]``: 1 prompt vs that prompt among 3,
  at each position).

It prints one line per comparison: the largest logit difference, and how many mask / soft /
overlay PNGs differ (of the images x prompts compared). Run it with the demo model and with
random full-size weights (``bench/make_model.py``):

    python bench/batch_identity.py --model demo
    python bench/batch_identity.py --model bench/_work/model-rd64-refined --images DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path, PurePosixPath

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clipseg_cli.io.sources import InputItem  # noqa: E402
from clipseg_cli.run.backend import ModelOpener, choose_backend  # noqa: E402
from clipseg_cli.run.config import SegmentConfig  # noqa: E402
from clipseg_cli.run.inputs import Work  # noqa: E402
from clipseg_cli.run.items import Prediction, predict_batch, prepare_item, write_item  # noqa: E402
from clipseg_cli.run.ledger import InputSignature  # noqa: E402
from clipseg_cli.run.outputs import MemorySink  # noqa: E402
from clipseg_cli.run.promptset import PromptModel, build_prompt_set  # noqa: E402

PROMPTS = ("a red circle", "a blue square", "a yellow triangle")


def outputs(prepared, logits: np.ndarray, config, prompts) -> dict:
    """The PNG bytes of one image from its whole-image logits [K, s, s]."""
    size = prepared.image.rgb.shape[:2]
    sink = MemorySink()
    write_item(prepared, Prediction(logits, len(prompts), size), config, prompts, sink)
    return {(r["prompt"], r["kind"]): r["data"] for r in sink.records}


def compare(name: str, base: list[np.ndarray], other: list[np.ndarray], pngs) -> None:
    worst = max(float(np.abs(a - b).max()) for a, b in zip(base, other, strict=True))
    same_logits = all(np.array_equal(a, b) for a, b in zip(base, other, strict=True))
    differing: dict[str, int] = {}
    total = 0
    for index, (a, b) in enumerate(zip(base, other, strict=True)):
        first, second = pngs(index, a), pngs(index, b)
        for key in first:
            total += 1
            differing[key[1]] = differing.get(key[1], 0) + (first[key] != second[key])
    shown = ", ".join(
        f"{kind} {count}/{total // len(differing)}" for kind, count in differing.items()
    )
    print(
        f"{name:<46} logits identical: {same_logits!s:<5} max |diff| {worst:.3g}; "
        f"PNGs that differ: {shown}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--images", type=Path, default=REPO / "sample_data")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    paths = sorted(p for p in args.images.iterdir() if p.suffix in (".png", ".jpg"))[: args.count]
    config = SegmentConfig(
        inputs=("-",),
        out_dir=Path("unused"),
        prompts=PROMPTS,
        model=args.model,
        precision=args.precision,
        save=("mask", "soft", "overlay"),
    )
    choice = choose_backend(config)
    prompt_model = PromptModel(config, choice)
    prompts = build_prompt_set(prompt_model, config)
    info, arch = prompt_model.identity
    opened = ModelOpener(config, info.sha256, arch, info.model_id, choice)()
    size = (arch.input_size, arch.input_size)
    print(f"model {info.model_id}, backend {opened.details}, {len(paths)} images")
    works = [
        Work(
            InputItem(p, PurePosixPath(p.name)), p.name, InputSignature.of(p), PurePosixPath(p.name)
        )
        for p in paths
    ]
    prepared = [prepare_item(w, config, size) for w in works]
    rows = [p.model_inputs[0] for p in prepared]
    one = prompts.vectors[:1]
    config1 = dataclasses.replace(config, prompts=PROMPTS[:1])

    def pngs1(index: int, logits: np.ndarray) -> dict:
        return outputs(prepared[index], logits, config1, prompts.positives[:1])

    # Batch size: each image alone, vs in batches of n (padded at the end, as the CLI does).
    alone = [predict_batch(opened.backend, [row], one)[0] for row in rows]
    for n in (2, 4, 8):
        batched = []
        for start in range(0, len(rows), n):
            batched += list(predict_batch(opened.backend, rows[start : start + n], one, pad_to=n))
        compare(f"batch 1 vs batch {n} (K=1)", alone, batched, pngs1)
    # Companions and rows at a fixed batch size: reversed order, padded alone.
    n = 4
    forward = []
    for start in range(0, len(rows), n):
        forward += list(predict_batch(opened.backend, rows[start : start + n], one, pad_to=n))
    backward = list(predict_batch(opened.backend, rows[::-1][:n], one, pad_to=n))[::-1]
    backward = [*forward[: len(rows) - n], *backward] if len(rows) > n else backward
    compare(f"batch {n}: other companions and rows", forward, backward, pngs1)
    padded = [predict_batch(opened.backend, [row], one, pad_to=n)[0] for row in rows]
    compare(f"batch {n}: full vs each image padded alone", forward, padded, pngs1)
    # Prompts: K=1 vs that prompt among 3 (each position), batch of 1.
    for position in range(3):
        order = [1, 2]
        order.insert(position, 0)
        union = prompts.vectors[order]
        among = [
            predict_batch(opened.backend, [row], union)[0][position : position + 1] for row in rows
        ]
        compare(f"K=1 vs the same prompt at {position} of K=3", alone, among, pngs1)


if __name__ == "__main__":
    main()
