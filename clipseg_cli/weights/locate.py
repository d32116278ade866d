"""Where weights come from: the Hugging Face hub through huggingface_hub's cache, folders and
files the user names, the models bundled in this package, and open_clip's registry for
OpenAI's CLIP (:func:`model_files`); and what an earlier load remembered about them
(:func:`identify`). No torch: a warm ONNX run finds and identifies its model with this module
alone; :mod:`.load` loads the weights.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
#: How long finding out whether the hub answers may take: an unattended machine that is offline
#: (no route, a firewall that drops packets, DNS that never answers) fails within it, instead
#: of huggingface_hub's five retries with backoff (about 24 s, minutes for dropped packets).
#: A healthy hub answers in a fraction of it; on a slow link, set ``HF_HUB_ETAG_TIMEOUT``
#: (huggingface_hub's own timeout for this request) and it is used instead.
HUB_PROBE_SECONDS = 1.5
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


def hub_offline() -> bool:
    """Whether the hub is out of reach: ``HF_HUB_OFFLINE`` is set (at once), or one request to
    it got no answer within :data:`HUB_PROBE_SECONDS` (asked once per process). Weights are then
    taken from huggingface_hub's cache only, by every command that loads a model."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}:
        return True
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or not _hub_answers(constants.ENDPOINT)


@functools.lru_cache(maxsize=4)
def _hub_answers(endpoint: str) -> bool:
    """Whether ``endpoint`` answers one HEAD request (any HTTP status) within the probe time
    (:data:`HUB_PROBE_SECONDS`, or ``HF_HUB_ETAG_TIMEOUT`` when set).

    The request runs in a daemon thread so that nothing it waits for (DNS included, which
    httpx's timeouts do not cover) can hold the command longer."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    answered: list[bool] = []

    def ask() -> None:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            get_hf_file_metadata(
                hf_hub_url(DEFAULT_MODEL, "config.json", endpoint=endpoint),
                timeout=_probe_seconds(),
            )
        except HfHubHTTPError:
            pass  # an HTTP error status is an answer: the hub is there
        except Exception:
            answered.append(False)
            return
        answered.append(True)

    probe = threading.Thread(target=ask, name="hub-probe", daemon=True)
    probe.start()
    probe.join(_probe_seconds() + 0.1)
    return bool(answered) and answered[0]


def _probe_seconds() -> float:
    try:
        return float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    except (KeyError, ValueError):
        return HUB_PROBE_SECONDS


@contextmanager
def _cache_only() -> Iterator[None]:
    """huggingface_hub's offline mode (the switch ``HF_HUB_OFFLINE=1`` sets), for these calls
    only: ``local_files_only`` alone still lets it ask the hub for other things first (its
    agent registry, seconds against an unreachable hub), and open_clip's registry cannot pass
    it at all."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def openai_clip_path() -> Path:
    """OpenAI's CLIP ViT-B/16 through open_clip's pretrained registry (hub cache)."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    try:
        if hub_offline():
            with _cache_only():
                return Path(download_pretrained(get_pretrained_cfg("ViT-B-16", "openai")))
        return Path(download_pretrained(get_pretrained_cfg("ViT-B-16", "openai")))
    except (OSError, RuntimeError, ValueError) as error:
        raise WeightsError(
            "the OpenAI CLIP ViT-B/16 weights are not cached and could not be downloaded "
            f"({first_line(error)}); pass --clip-weights PATH to a local copy"
        ) from None


def hub_files(repo_id: str, extra: tuple[str, ...] = (), option: str = "--model") -> list[Path]:
    """config.json + weights (+ the ``extra`` files) of a hub repo, via huggingface_hub's
    cache (HF_HOME): from the cache alone when the hub is out of reach (:func:`hub_offline`),
    so an offline machine fails (or finds its cached files) within seconds. ``option`` names
    the option that takes a local folder instead, for the error message.

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

    offline = hub_offline()

    def download(name: str) -> str:
        if not offline:
            return hf_hub_download(repo_id, name)
        with _cache_only():  # even building headers may ask the hub something, when online
            return hf_hub_download(repo_id, name, local_files_only=True)

    try:
        config = download("config.json")
        try:
            weights = download("model.safetensors")
        except (EntryNotFoundError, LocalEntryNotFoundError):
            weights = download("pytorch_model.bin")
        others = [Path(download(name)) for name in extra]
    except RepositoryNotFoundError:
        raise WeightsError(
            f"model {repo_id!r}: no such repository on the Hugging Face hub"
        ) from None
    except (LocalEntryNotFoundError, OSError, HFValidationError) as error:
        offline_env = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
        how = "HF_HUB_OFFLINE is set" if offline_env else "the hub could not be reached"
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
