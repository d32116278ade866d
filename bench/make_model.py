"""Write random full-size rd64-refined weights plus an offline CLIPSegProcessor to a folder.

A separate script (run as a subprocess by run_bench.py) rather than a function call: building
the model in the harness would leave the harness at ~2 GB RSS, and on Linux a child's
``ru_maxrss`` starts from its parent's RSS at fork time, so every measured child would then
report at least that much.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from factories import save_random_hf_checkpoint  # noqa: E402
from hf_processor import save_clipseg_processor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--variant", default="rd64-refined")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = save_random_hf_checkpoint(
        args.directory, variant=args.variant, size="full", seed=args.seed
    )
    # Next to the weights: the reference script loads it; our CLI ignores these extra files.
    save_clipseg_processor(Path(out))
    print(out)


if __name__ == "__main__":
    main()
