"""Local engine vs Ray engine on one machine: images/s of each on the same generated images.

Both runs go through ``pipeline.run_segment`` in this process (model loading included, as a
user sees it); the Ray cluster is started before the clock starts, as a cluster would already
be running. The outputs of both runs are compared byte for byte.

    python bench/engines_bench.py --model bench/_work/model-rd64-refined --count 16

On one machine Ray adds scheduling and copies between processes, so it is expected to be no
faster than the local engine: it is there to spread a run over several machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_images import make_photo_like_jpegs

from clipseg_cli.run import pipeline
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.ledger import STATE_DIR


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and not path.relative_to(out).as_posix().startswith((STATE_DIR, "clip"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (or any --model value)")
    parser.add_argument("--count", type=int, default=16, help="images to generate and segment")
    parser.add_argument("--size", default="1024x768", help="image size WxH")
    parser.add_argument("--images", type=Path, help="reuse/extend this image folder")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument(
        "--ray-cpus",
        type=int,
        default=(os.cpu_count() or 1) + 1,
        help="logical CPUs of the local Ray cluster [default: cores + 1: one actor gets all "
        "cores, like the local engine's torch, and one is left for decode/write tasks]",
    )
    parser.add_argument("--save", default="mask,soft")
    args = parser.parse_args()

    import ray

    width, height = (int(v) for v in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="clipseg-engines-"))
    images = args.images or work / "images"
    make_photo_like_jpegs(images, args.count, (width, height))
    if args.images is not None:  # only the first --count of a larger folder
        subset = work / "images"
        subset.mkdir()
        for path in sorted(images.glob("img_*.jpg"))[: args.count]:
            (subset / path.name).symlink_to(path.resolve())
        images = subset
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        rates = {}
        for engine in ("local", "ray"):
            config = SegmentConfig(
                inputs=(str(images),),
                out_dir=work / engine,
                prompts=("a person", "a car"),
                save=tuple(args.save.split(",")),
                model=args.model,
                device="cpu",
                batch_size=args.batch_size,
                engine=engine,
                actors=args.actors,
            )
            summary = pipeline.run_segment(config)
            rates[engine] = summary
        same = _outputs(work / "local") == _outputs(work / "ray")
        local, ray_run = rates["local"], rates["ray"]
        print(
            f"engines ({args.count} images {args.size}, {os.cpu_count()} cores, batch "
            f"{args.batch_size}, model {args.model}): local {local.images_per_second:.2f} "
            f"img/s ({local.seconds:.1f}s), ray {ray_run.images_per_second:.2f} img/s "
            f"({ray_run.seconds:.1f}s, {args.actors} actor); outputs identical: {same}"
        )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
