"""Where weights come from: the Hugging Face hub through huggingface_hub's cache, folders and
files the user names, the models bundled in this package, and open_clip's registry for
OpenAI's CLIP; then :func:`load_weights`, the one entry point that loads any of them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from clipseg_cli.errors import WeightsError, first_line
from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.specs import DEFAULT_MODEL, MODEL_SPECS, resolve_model
from clipseg_cli.weights.convert import (
    COMPONENTS,
    load_original,
    load_transformers_dir,
    variant_name,
)
from clipseg_cli.weights.files import file_sha256

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The package's root folder: bundled models' folders are relative to it.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model came from, for logs and run summaries."""

    model_id: str
    layout: str  # "transformers" or "original"
    variant: str  # a MODEL_SPECS name, or "custom" for other architectures
    files: tuple[str, ...]
    sha256: str


def openai_clip_path() -> Path:
    """OpenAI's CLIP ViT-B/16 through open_clip's pretrained registry (hub cache)."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    try:
        return Path(download_pretrained(get_pretrained_cfg("ViT-B-16", "openai")))
    except (OSError, RuntimeError, ValueError) as error:
        raise WeightsError(
            "the OpenAI CLIP ViT-B/16 weights are not cached and could not be downloaded "
            f"({first_line(error)}); pass --clip-weights PATH to a local copy"
        ) from None


def hub_files(repo_id: str, extra: tuple[str, ...] = (), option: str = "--model") -> list[Path]:
    """config.json + weights (+ the ``extra`` files) of a hub repo, via huggingface_hub's
    cache (HF_HOME; offline with HF_HUB_OFFLINE). ``option`` names the option that takes a
    local folder instead, for the error message.

    Raises:
        WeightsError: not cached and not downloadable (one line saying what to do).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    try:
        config = hf_hub_download(repo_id, "config.json")
        try:
            weights = hf_hub_download(repo_id, "model.safetensors")
        except (EntryNotFoundError, LocalEntryNotFoundError):
            weights = hf_hub_download(repo_id, "pytorch_model.bin")
        others = [Path(hf_hub_download(repo_id, name)) for name in extra]
    except RepositoryNotFoundError:
        raise WeightsError(
            f"model {repo_id!r}: no such repository on the Hugging Face hub"
        ) from None
    except (LocalEntryNotFoundError, OSError, HFValidationError) as error:
        how = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise WeightsError(
            f"model {repo_id!r} is not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and {how} "
            f"({first_line(error)}). Run once with network access, or pass {option} with a "
            "local folder (config.json + model.safetensors)."
        ) from None
    return [Path(config), Path(weights), *others]


def bundled_model_dir(model: str) -> Path | None:
    """The folder shipped in this package for a bundled model name (``demo``), else None.

    A bundled name wins over a folder of the same name in the working directory (write
    ``./demo`` for that one).
    """
    spec = MODEL_SPECS.get(model)
    if spec is None or spec.bundled is None:
        return None
    directory = _PACKAGE_DIR / spec.bundled
    if not (directory / "config.json").is_file():
        raise WeightsError(
            f"model {model!r}: its bundled files are missing from {directory} (an incomplete "
            "install: reinstall clipseg-cli)"
        )
    return directory


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
    """
    bundled = bundled_model_dir(model)
    kind, path = ("dir", bundled) if bundled is not None else resolve_model(model)
    if clip_weights is not None and kind != "file":
        raise WeightsError("--clip-weights only goes with an original decoder file as --model")
    if kind == "file":
        clip_path = Path(clip_weights).expanduser() if clip_weights is not None else None
        built, files, arch = load_original(
            path, lambda: clip_path or openai_clip_path(), dtype, components
        )
        layout = "original"
    elif kind == "dir":
        built, files, arch = load_transformers_dir(path, dtype, components)
        layout = "transformers"
    else:
        repo_id = MODEL_SPECS[model].hub_id if model in MODEL_SPECS else model
        if not _HUB_ID.match(repo_id):
            raise WeightsError(
                f"model {model!r}: not a folder, a file, a known name "
                f"({', '.join(MODEL_SPECS)}) or a hub id like {DEFAULT_MODEL}"
            )
        files = hub_files(repo_id)
        built, _, arch = load_transformers_dir(files[0].parent, dtype, components)
        layout = "transformers"
    info = WeightsInfo(
        model_id=model,
        layout=layout,
        variant=variant_name(arch),
        files=tuple(str(f) for f in files),
        sha256=file_sha256([f for f in files if f.name != "config.json"]),
    )
    return built, info


def cached_hub_files(repo_id: str) -> bool:
    """Whether a hub model's config and weights are already in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, name), str)

    return cached("config.json") and (cached("model.safetensors") or cached("pytorch_model.bin"))
