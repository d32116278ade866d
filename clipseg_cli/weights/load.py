""":func:`load_weights`, the one entry point that loads any supported model (torch)."""

from __future__ import annotations

from pathlib import Path

import torch

from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.specs import DEFAULT_MODEL
from clipseg_cli.weights.convert import COMPONENTS, load_original, load_transformers_dir
from clipseg_cli.weights.identity import Identity, remember, sha256_of
from clipseg_cli.weights.locate import WeightsInfo, model_files, openai_clip_path, weights_info


def load_weights(
    model: str = DEFAULT_MODEL,
    *,
    clip_weights: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    components: frozenset[str] = COMPONENTS,
) -> tuple[ClipSegModel, WeightsInfo]:
    """Load any supported model spec into an eval-mode :class:`ClipSegModel` on the CPU.

    Args:
        model: a hub id (``CIDAS/clipseg-rd64-refined``), a short name from ``MODEL_SPECS``
            (``rd64``; ``demo`` is bundled with the package), a transformers-layout folder, or
            an original decoder file.
        clip_weights: OpenAI-format CLIP weights, only with an original decoder file.
        dtype: parameter dtype.
        components: the parts of :data:`COMPONENTS` to load; the others are left out.

    The files' sha256 and the architecture are remembered for later runs
    (:mod:`clipseg_cli.weights.identity`).
    """
    found = model_files(model, clip_weights)
    if found.layout == "original":
        clip = found.files[1] if len(found.files) > 1 else None
        built, files, arch = load_original(
            found.location, lambda: clip or openai_clip_path(), dtype, components
        )
    else:
        built, files, arch = load_transformers_dir(found.location, dtype, components)
    files = tuple(files)
    sha256 = sha256_of(files)
    remember(files, Identity(sha256, arch))
    return built, weights_info(found, files, sha256, arch)
