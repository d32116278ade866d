"""Where weights come from: the Hugging Face hub through huggingface_hub's cache, folders and
files the user names, the models bundled in this package, and open_clip's registry for
OpenAI's CLIP (:func:`model_files`); and what an earlier load remembered about them
(:func:`identify`). No torch: a warm ONNX run finds and identifies its model with this module
alone; :mod:`.load` loads the weights.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from clipseg_cli.errors import WeightsError, first_line
from clipseg_cli.specs import (
    DEFAULT_MODEL,
    MODEL_SPECS,
    ArchitectureSpec,
    resolve_model,
    variant_name,
)
from clipseg_cli.weights.identity import recall

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


@dataclass(frozen=True)
class ModelFiles:
    """The files a ``--model`` value names, found without reading them."""

    model_id: str
    layout: str  # "transformers" or "original"
    #: transformers: the folder; original: the decoder file.
    location: Path
    #: Every file the model is made of (config.json first for the transformers layout); for
    #: an original decoder file without ``--clip-weights``, only the decoder: finding OpenAI's
    #: CLIP takes open_clip (:func:`openai_clip_path`).
    files: tuple[Path, ...]

    @property
    def complete(self) -> bool:
        """Whether :attr:`files` names every file (false only while CLIP is not yet found)."""
        return self.layout == "transformers" or len(self.files) == 2


def transformers_files(directory: Path) -> tuple[Path, Path]:
    """(config.json, the weights file) of a transformers-layout folder; safetensors first.

    Raises:
        WeightsError: either is missing.
    """
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{directory}: no config.json (not a transformers model folder)")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return config_path, directory / name
    raise WeightsError(f"{directory}: no model.safetensors or pytorch_model.bin")


def model_files(model: str = DEFAULT_MODEL, clip_weights: str | Path | None = None) -> ModelFiles:
    """Where the weights of ``model`` are (hub cache, bundled, a folder, an original decoder
    file): no torch, nothing read but names and, for the hub, huggingface_hub's cache.

    Raises:
        WeightsError: nothing loadable there (one line saying what to do).
    """
    bundled = bundled_model_dir(model)
    kind, path = ("dir", bundled) if bundled is not None else resolve_model(model)
    if clip_weights is not None and kind != "file":
        raise WeightsError("--clip-weights only goes with an original decoder file as --model")
    if kind == "file":
        clip = (Path(clip_weights).expanduser(),) if clip_weights is not None else ()
        return ModelFiles(model, "original", path, (path, *clip))
    if kind == "dir":
        return ModelFiles(model, "transformers", path, transformers_files(path))
    repo_id = MODEL_SPECS[model].hub_id if model in MODEL_SPECS else model
    if not _HUB_ID.match(repo_id):
        raise WeightsError(
            f"model {model!r}: not a folder, a file, a known name "
            f"({', '.join(MODEL_SPECS)}) or a hub id like {DEFAULT_MODEL}"
        )
    config_path, weights_path = hub_files(repo_id)
    return ModelFiles(model, "transformers", config_path.parent, (config_path, weights_path))


def weights_info(
    found: ModelFiles, files: tuple[Path, ...], sha256: str, arch: ArchitectureSpec
) -> WeightsInfo:
    """What runs record about a loaded model."""
    return WeightsInfo(
        model_id=found.model_id,
        layout=found.layout,
        variant=variant_name(arch),
        files=tuple(str(f) for f in files),
        sha256=sha256,
    )


def identify(
    model: str = DEFAULT_MODEL, clip_weights: str | Path | None = None
) -> tuple[WeightsInfo, ArchitectureSpec] | None:
    """The model's record and architecture without loading it, when an earlier load
    remembered them (:mod:`.identity`) and its files have not changed since; else None.

    Raises:
        WeightsError: nothing loadable there.
    """
    found = model_files(model, clip_weights)
    if not found.complete:
        return None
    known = recall(found.files)
    if known is None:
        return None
    return weights_info(found, found.files, known.sha256, known.arch), known.arch


def cached_hub_paths(repo_id: str) -> tuple[Path, Path] | None:
    """(config.json, weights) of a hub model in the local cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> Path | None:
        found = try_to_load_from_cache(repo_id, name)
        return Path(found) if isinstance(found, str) else None

    config = cached("config.json")
    weights = cached("model.safetensors") or cached("pytorch_model.bin")
    return (config, weights) if config is not None and weights is not None else None


def cached_hub_files(repo_id: str) -> bool:
    """Whether a hub model's config and weights are already in the local cache (no network)."""
    return cached_hub_paths(repo_id) is not None
