"""Reference: CLIPSeg masks for a folder the way a typical transformers user writes it.

Deliberately naive (it is the baseline the CLI is compared against): one forward pass per
image-prompt pair, the processor's own preprocessing, default torch threads, sigmoid, bilinear
resize to the original image size, threshold, PNG. Do not "optimise" this file.

Masks go to ``OUT/<image name>.<prompt slug>.mask.png`` (0/255, mode L) so that the benchmark
can pair them with the CLI's masks. The last stdout line is a JSON summary with timings.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_THRESHOLD = 0.3


def prompt_slug(prompt: str) -> str:
    """Filename-safe prompt: lowercase, runs of non-alphanumerics -> '-'."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-") or "prompt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="save_pretrained directory")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    # What a GPU user adds to the typical script: the model and each input on the device.
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()

    start = time.perf_counter()
    processor = CLIPSegProcessor.from_pretrained(str(args.model))
    model = CLIPSegForImageSegmentation.from_pretrained(str(args.model)).eval().to(args.device)
    loaded = time.perf_counter()

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if args.limit is not None:
        paths = paths[: args.limit]
    args.out.mkdir(parents=True, exist_ok=True)

    for path in paths:
        image = Image.open(path).convert("RGB")
        for prompt in args.prompt:
            inputs = processor(
                text=[prompt], images=[image], padding="max_length", return_tensors="pt"
            ).to(args.device)
            with torch.no_grad():
                logits = model(**inputs).logits
            prob = torch.sigmoid(logits)
            # logits are (352, 352) or (1, 352, 352) depending on batch squeezing; interpolate
            # wants (N, C, H, W).
            prob = prob.reshape(1, 1, *prob.shape[-2:])
            prob = torch.nn.functional.interpolate(
                prob, size=(image.height, image.width), mode="bilinear", align_corners=False
            )[0, 0]
            mask = (prob > args.threshold).cpu().numpy().astype(np.uint8) * 255
            out_path = args.out / f"{path.name}.{prompt_slug(prompt)}.mask.png"
            Image.fromarray(mask, mode="L").save(out_path)

    done = time.perf_counter()
    loop_s = done - loaded
    summary = {
        "images": len(paths),
        "prompts": len(args.prompt),
        "load_s": round(loaded - start, 3),
        "elapsed_s": round(loop_s, 3),
        "images_per_s": round(len(paths) / loop_s, 4) if loop_s > 0 else None,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
