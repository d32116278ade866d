"""Finding, safely reading and strictly converting CLIPSeg checkpoints of every public layout.

Layouts:

* transformers (``CIDAS/clipseg-*`` on the Hugging Face hub, or a local ``save_pretrained``
  folder): ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``;
* original repository: a decoder-only file (``rd64-uni-refined.pth`` ...) plus an OpenAI-format
  CLIP ViT-B/16 state dict (or open_clip's ``openai`` pretrained weights).

:mod:`.locate` finds weights (hub cache, folders, bundled models) and :mod:`.identity`
remembers what they are: both without torch, so a warm ONNX run never imports it.
:mod:`.files` reads files safely, :mod:`.convert` maps keys strictly and :mod:`.load` holds
:func:`load_weights`; those need torch and are imported when first used.
"""

from __future__ import annotations

from typing import Any

from clipseg_cli.errors import WeightsError
from clipseg_cli.weights.locate import (
    ModelFiles,
    WeightsInfo,
    bundled_model_dir,
    cached_hub_files,
    identify,
    model_files,
)

#: The torch-side names, and the module each comes from (imported on first use).
_TORCH_SIDE = {
    "COMPONENTS": "clipseg_cli.weights.convert",
    "component_of": "clipseg_cli.weights.convert",
    "save_transformers_dir": "clipseg_cli.weights.convert",
    "read_state_dict": "clipseg_cli.weights.files",
    "load_weights": "clipseg_cli.weights.load",
}


def __getattr__(name: str) -> Any:
    module = _TORCH_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module 'clipseg_cli.weights' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "COMPONENTS",
    "ModelFiles",
    "WeightsError",
    "WeightsInfo",
    "bundled_model_dir",
    "cached_hub_files",
    "component_of",
    "identify",
    "load_weights",
    "model_files",
    "read_state_dict",
    "save_transformers_dir",
]
