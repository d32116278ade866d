"""What a training run leaves on disk: resumable checkpoints (:func:`save_checkpoint`,
:func:`load_checkpoint`), the fingerprint a resumed run must match (:func:`resume_fingerprint`),
and the exported model with its ``training.json`` (:func:`export_model`).

Checkpoints are safetensors (model, optimizer tensors, torch RNG, the token classifier) plus
JSON (everything else): never pickles. Every file is written atomically
(:mod:`clipseg_cli.io.files`), and ``checkpoint.json`` last, so a crash leaves the previous
checkpoint usable. Nothing here decides what to train or when to save.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from clipseg_cli.errors import first_line
from clipseg_cli.io.files import atomic_target, sha256_file, write_bytes_atomic
from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.model.precision import DTYPES
from clipseg_cli.train.config import EpochStats, TrainConfig, TrainError, TrainResult
from clipseg_cli.train.losses import TokenClassifier

CHECKPOINT_JSON = "checkpoint.json"
# Config fields that may change between a checkpoint and its resumption.
RESUMABLE_CHANGES = frozenset({"epochs", "resume", "device", "checkpoint_dir", "out_dir"})
# Config fields training.json leaves out: where and how the run ran, not what it learnt.
_NOT_RECORDED = frozenset({"out_dir", "checkpoint_dir", "resume", "device"})


def _settings(config: TrainConfig, leave_out: frozenset[str]) -> dict:
    """The config's fields as JSON values (paths as strings), minus ``leave_out``."""
    return {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in asdict(config).items()
        if key not in leave_out
    }


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def resume_fingerprint(config: TrainConfig, manifest_sha: str) -> dict:
    """What must not change between a checkpoint and its resumption: every setting but
    :data:`RESUMABLE_CHANGES`, and the manifest's sha256 (``manifest_sha``)."""
    values = _settings(config, RESUMABLE_CHANGES)
    values["manifest_sha256"] = manifest_sha
    return values


def save_checkpoint(
    directory: Path,
    model: ClipSegModel,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    global_step: int,
    fingerprint: dict,
    history: list[EpochStats],
    token_classifier: TokenClassifier | None = None,
) -> Path:
    """Write ``epoch-N.safetensors`` (model, optimizer tensors, torch RNG, the training-only
    token classifier if any) and then ``checkpoint.json`` (everything else), each atomically;
    older tensor files are removed afterwards.

    The JSON is written last, so a crash leaves the previous checkpoint usable."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    layout: dict[str, list[str]] = {}
    for index, slots in state["state"].items():
        layout[str(index)] = []
        for name, value in slots.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name!r} is not a tensor")
            tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            layout[str(index)].append(name)
    tensors["rng.torch"] = torch.get_rng_state()
    if token_classifier is not None:
        for key, value in token_classifier.state_dict().items():
            tensors[f"aux.{key}"] = value.detach().cpu().contiguous()
    name = f"epoch-{epoch:04d}.safetensors"
    with atomic_target(directory / name) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "format": 1,
        "tensors": name,
        "epoch": epoch,
        "global_step": global_step,
        "fingerprint": fingerprint,
        "optimizer": {"param_groups": state["param_groups"], "state_layout": layout},
        "history": [asdict(s) for s in history],
    }
    write_bytes_atomic(directory / CHECKPOINT_JSON, _json_bytes(meta))
    for old in directory.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink()
    return directory / CHECKPOINT_JSON


def load_checkpoint(
    directory: Path,
    model: ClipSegModel,
    optimizer: torch.optim.Optimizer,
    fingerprint: dict,
    token_classifier: TokenClassifier | None = None,
) -> tuple[int, int, list[EpochStats]]:
    """Restore model, optimizer and torch RNG from ``directory``; (epoch, global step, history).

    Raises:
        TrainError: no checkpoint, unreadable, or made by a run with other settings.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path = Path(directory) / CHECKPOINT_JSON
    if not meta_path.is_file():
        raise TrainError(f"{directory}: no {CHECKPOINT_JSON} to resume from")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(Path(directory) / meta["tensors"]))
    except (OSError, json.JSONDecodeError, KeyError, SafetensorError) as error:
        raise TrainError(f"{meta_path}: unreadable checkpoint ({first_line(error)})") from None
    saved = meta.get("fingerprint", {})
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        raise TrainError(
            f"{meta_path}: made with different settings ({', '.join(changed)}); resume with the "
            "same ones or use another --checkpoint-dir"
        )
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=True)
    if token_classifier is not None:
        aux_state = {k[len("aux.") :]: v for k, v in tensors.items() if k.startswith("aux.")}
        token_classifier.load_state_dict(aux_state, strict=True)
    optim_state: dict = {"state": {}, "param_groups": meta["optimizer"]["param_groups"]}
    for index, names in meta["optimizer"]["state_layout"].items():
        optim_state["state"][int(index)] = {n: tensors[f"optim.{index}.{n}"] for n in names}
    optimizer.load_state_dict(optim_state)
    torch.set_rng_state(tensors["rng.torch"])
    history = [EpochStats(**s) for s in meta.get("history", [])]
    return int(meta["epoch"]), int(meta["global_step"]), history


def export_model(
    model: ClipSegModel, config: TrainConfig, origin: str, result: TrainResult
) -> Path:
    """``config.json`` + ``model.safetensors`` (loadable with ``--model OUT``) and
    ``training.json`` (settings and per-epoch numbers) in ``config.out_dir``."""
    from clipseg_cli.weights import save_transformers_dir

    out = save_transformers_dir(model, config.out_dir, dtype=DTYPES[config.save_dtype])
    record = {
        "started_from": origin,
        "settings": _settings(config, _NOT_RECORDED),
        "manifest_sha256": sha256_file(config.manifest),
        "train_images": result.train_images,
        "val_images": result.val_images,
        "history": [asdict(s) for s in result.history],
        "iou_convention": "IoU_FG = TP/(TP+FP+FN) summed over the validation set, prob > t",
    }
    write_bytes_atomic(out / "training.json", _json_bytes(record))
    return out
