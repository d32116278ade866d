"""One ``clipseg eval`` / ``clipseg calibrate`` run's options, validated: :class:`EvalConfig`.

It owns what the inputs and options must satisfy before anything is read and how they are
shown in the report and the threshold file. It never touches a file's content (only whether a
folder exists), never loads a model, and raises a one-line ``ValueError`` rather than printing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipseg_cli.io.paths import display_path
from clipseg_cli.specs import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_THRESHOLD


@dataclass(frozen=True)
class EvalConfig:
    """One ``clipseg eval`` / ``calibrate`` run. Validation raises a one-line ValueError.

    ``model``, ``clip_weights``, ``device`` and ``precision`` are the model options of
    :meth:`clipseg_cli.segmenter.Segmenter.load_for` (used with ``images_dir`` only).
    """

    gt_dir: Path
    pred_dir: Path | None = None
    images_dir: Path | None = None
    prompts: tuple[str, ...] = ()
    pred_slug: str | None = None
    matting: bool = False
    threshold: float = DEFAULT_THRESHOLD
    model: str = DEFAULT_MODEL
    clip_weights: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 4
    keep_preds: Path | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if (self.pred_dir is None) == (self.images_dir is None):
            raise ValueError("give either --pred DIR or --images DIR (with --prompt)")
        if not self.gt_dir.is_dir():
            raise ValueError(f"--gt {display_path(self.gt_dir)}: not a folder")
        if self.pred_dir is not None and not self.pred_dir.is_dir():
            raise ValueError(f"--pred {display_path(self.pred_dir)}: not a folder")
        if self.images_dir is not None:
            if not self.images_dir.is_dir():
                raise ValueError(f"--images {display_path(self.images_dir)}: not a folder")
            if not self.prompts:
                raise ValueError("--images needs at least one --prompt TEXT")
        elif self.prompts:
            raise ValueError("--prompt is only used with --images")
        if any(not prompt.strip() for prompt in self.prompts):
            raise ValueError("--prompt: empty prompt text")
        if self.keep_preds is not None and self.images_dir is None:
            raise ValueError("--keep-preds is only used with --images")
        if not (isinstance(self.threshold, int | float) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"--threshold {self.threshold}: must be between 0 and 1")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.precision == "int8":
            raise ValueError(
                "--precision int8: eval runs the model with torch; to score the int8 graph, "
                "segment with --precision int8 and eval --pred that folder"
            )

    def describe(self) -> dict[str, Any]:
        """JSON-ready view of the inputs, for the report and the threshold file."""
        show = lambda p: display_path(p) if p is not None else None  # noqa: E731
        return {
            "gt": show(self.gt_dir),
            "pred": show(self.pred_dir),
            "images": show(self.images_dir),
            "prompts": list(self.prompts),
            "pred_slug": self.pred_slug,
            "model": self.model if self.images_dir is not None else None,
            "matting": self.matting,
        }
