"""Finding, safely reading and strictly converting CLIPSeg checkpoints of every public layout.

Layouts:

* transformers (``CIDAS/clipseg-*`` on the Hugging Face hub, or a local ``save_pretrained``
  folder): ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``;
* original repository: a decoder-only file (``rd64-uni-refined.pth`` ...) plus an OpenAI-format
  CLIP ViT-B/16 state dict (or open_clip's ``openai`` pretrained weights).

:mod:`.files` reads files safely, :mod:`.convert` maps keys strictly, :mod:`.locate` finds
weights (hub cache, folders, bundled models) and holds :func:`load_weights`.
"""

from clipseg_cli.errors import WeightsError
from clipseg_cli.weights.convert import COMPONENTS, component_of, save_transformers_dir
from clipseg_cli.weights.files import read_state_dict
from clipseg_cli.weights.locate import (
    WeightsInfo,
    bundled_model_dir,
    cached_hub_files,
    load_weights,
)

__all__ = [
    "COMPONENTS",
    "WeightsError",
    "WeightsInfo",
    "bundled_model_dir",
    "cached_hub_files",
    "component_of",
    "load_weights",
    "read_state_dict",
    "save_transformers_dir",
]
