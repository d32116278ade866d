"""Segment Anything refinement (``--refine sam``, the ``[sam]`` extra): CLIPSeg says where an
object is, SAM says where its edge runs.

Each connected region of a prompt's mask goes to SAM as a box (the region's bounding box) plus
one positive point (the region's most probable pixel), both in the image's pixel coordinates:
SAM ignores mask-only prompts. SAM's mask probability for that region replaces CLIPSeg's inside
the region's box; elsewhere CLIPSeg's probability stays. transformers' ``SamModel`` and
``SamProcessor`` run it; the weights come through huggingface_hub's cache like CLIPSeg's
(``facebook/sam-vit-base`` by default, or a local folder in the transformers layout).

Its quality on real photos has not been measured by this project (no SAM weights can be
downloaded where it is developed); the plumbing is tested with a random-weight SamModel.
Nothing here prints; a SAM failure on one image raises :class:`SamFailedError`, which that image's
log row reports.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from clipseg_cli.errors import InputError, first_line
from clipseg_cli.specs import resolve_model

if TYPE_CHECKING:
    import torch

INSTALL_HINT = "pip install 'clipseg-cli[sam]'"
#: At most this many regions of one prompt go to SAM (the largest): bounds the cost per image.
MAX_REGIONS = 32
#: Regions smaller than this share of the image are specks, left as they are.
MIN_REGION_FRACTION = 1e-4
# The files of a transformers SamModel folder besides config.json and the weights.
_PROCESSOR_FILES = ("preprocessor_config.json",)


class SamNotInstalledError(ValueError):
    """``--refine sam`` without transformers (a usage error: the fix is an install)."""


class SamFailedError(InputError):
    """SAM could not refine one image; ``str()`` is one line for its log row."""


def require_sam() -> None:
    """Check that transformers (SamModel) can be imported; raise with the install hint if not."""
    try:
        from transformers import SamModel, SamProcessor  # noqa: F401
    except ImportError:
        raise SamNotInstalledError(
            f"--refine sam needs transformers, which is not installed: {INSTALL_HINT}"
        ) from None


def locate(model: str) -> Path:
    """The folder of a SAM model: a local folder as it is, a hub id through huggingface_hub's
    cache (downloaded once).

    Raises:
        WeightsError: not cached and not downloadable, with the same one-line message as the
            CLIPSeg weights.
    """
    kind, path = resolve_model(model)
    if kind == "dir" and path is not None:
        return path
    from clipseg_cli.weights.locate import hub_files

    files = hub_files(model, extra=_PROCESSOR_FILES, option="--sam-model")
    return files[0].parent


class SamRefiner:
    """A loaded SAM (model + processor) on a device."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        import torch
        from transformers import SamModel, SamProcessor

        from clipseg_cli.errors import WeightsError

        try:
            self.processor = SamProcessor.from_pretrained(folder)
            self.model = SamModel.from_pretrained(folder).to(device).eval()
        except (OSError, ValueError) as error:
            raise WeightsError(
                f"--sam-model {folder}: not a SAM model ({first_line(error)})"
            ) from None
        self.device = device
        self._torch = torch

    def refine(self, rgb: np.ndarray, prob: np.ndarray, threshold: float) -> np.ndarray:
        """float32 ``[H, W]``: ``prob`` with each region's box replaced by SAM's probability.

        Raises:
            SamFailedError: the model failed on this image.
        """
        regions = mask_regions(prob > threshold, prob)
        if not regions:
            return prob
        boxes = [[box for box, _ in regions]]
        points = [[[point] for _, point in regions]]
        labels = [[[1] for _ in regions]]
        try:
            inputs = self.processor(
                images=np.array(rgb), input_boxes=boxes, input_points=points, input_labels=labels,
                return_tensors="pt",
            )  # fmt: skip
            sizes, reshaped = inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes")
            inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with self._torch.inference_mode():
                output = self.model(**inputs, multimask_output=False)
            (logits,) = self.processor.image_processor.post_process_masks(
                output.pred_masks.float().cpu(), sizes, reshaped, binarize=False
            )
        except (RuntimeError, ValueError, IndexError, TypeError) as error:
            raise SamFailedError(f"SAM refinement failed: {first_line(error)}") from None
        sam_prob = self._torch.sigmoid(logits[:, 0]).numpy()  # [regions, H, W]
        refined = prob.astype(np.float32, copy=True)
        for (x0, y0, x1, y1), _ in regions:
            window = (slice(y0, y1 + 1), slice(x0, x1 + 1))
            refined[window] = 0.0
        for ((x0, y0, x1, y1), _), region in zip(regions, sam_prob, strict=True):
            window = (slice(y0, y1 + 1), slice(x0, x1 + 1))
            refined[window] = np.maximum(refined[window], region[window])
        return refined


def mask_regions(mask: np.ndarray, prob: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """The largest connected regions of ``mask`` (8-connected): each ``([x0, y0, x1, y1],
    [x, y])``, its inclusive bounding box and its most probable pixel, in pixel coordinates."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    smallest = MIN_REGION_FRACTION * mask.size
    order = sorted(range(1, count), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    regions = []
    for index in order[:MAX_REGIONS]:
        if stats[index, cv2.CC_STAT_AREA] < smallest:
            break
        x, y = int(stats[index, cv2.CC_STAT_LEFT]), int(stats[index, cv2.CC_STAT_TOP])
        w, h = int(stats[index, cv2.CC_STAT_WIDTH]), int(stats[index, cv2.CC_STAT_HEIGHT])
        inside = np.where(labels[y : y + h, x : x + w] == index, prob[y : y + h, x : x + w], -1)
        py, px = np.unravel_index(int(np.argmax(inside)), inside.shape)
        regions.append(([x, y, x + w - 1, y + h - 1], [x + int(px), y + int(py)]))
    return regions


_REFINERS: dict[tuple[str, str], SamRefiner] = {}
_LOCK = threading.Lock()


def refiner_for(model: str, device: str) -> SamRefiner:
    """The process's SAM for ``--sam-model`` on ``--device``, loaded once (writer threads and
    Ray workers share it)."""
    with _LOCK:
        key = (model, device)
        if key not in _REFINERS:
            from clipseg_cli.segmenter import resolve_device

            _REFINERS[key] = SamRefiner(locate(model), resolve_device(device))
        return _REFINERS[key]
