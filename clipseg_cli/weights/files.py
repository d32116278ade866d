"""Reading checkpoint files safely: safetensors tensor by tensor, pickles only through
``torch.load(weights_only=True)``, TorchScript archives without unpickling Python objects; and
the weights' sha256 that runs record.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from clipseg_cli.errors import WeightsError, first_line

StateDict = Mapping[str, torch.Tensor]
# Metadata entries of OpenAI's CLIP state dict; not tensors of the network.
OPENAI_METADATA_KEYS = frozenset({"input_resolution", "context_length", "vocab_size"})


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then JSON ``{``."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: Path) -> StateDict:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    safetensors is preferred; other files go through ``torch.load(weights_only=True)``, which
    refuses pickles that would run arbitrary code. OpenAI's TorchScript CLIP archives are read
    with ``torch.jit.load`` (TorchScript does not unpickle arbitrary Python objects).
    """
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file, not a checkpoint")
    if _is_safetensors(path):
        return _LazySafetensors(path)
    is_zip = zipfile.is_zipfile(path)
    if is_zip and _is_torchscript_archive(path):
        return _read_torchscript(path)
    try:
        # mmap: tensors stay in the page cache until converted, so loading never holds the
        # file's tensors and the model's side by side.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Unsupported" in str(error):
            raise WeightsError(
                f"{path}: refused: this pickle needs arbitrary code to load; only plain tensor "
                "checkpoints are accepted (torch.load weights_only=True). Convert it to "
                "safetensors in a trusted environment."
            ) from None
        raise WeightsError(f"{path}: not a PyTorch checkpoint ({first_line(error)})") from None
    except Exception as error:  # an untrusted file can break the unpickler in
        # any of a dozen ways (KeyError, struct.error, ...): each is "not a checkpoint".
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint (truncated or another format: "
            f"{first_line(error)})"
        ) from None
    return _as_state_dict(loaded, path)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _LazySafetensors(Mapping):
    """A safetensors file as a read-only ``{name: tensor}`` mapping that reads each tensor
    when asked.

    Tensors are read with plain file reads rather than through a memory map: the pages of a
    mapped 600 MB file would count towards the process's resident memory next to the model
    built from them. Converting one tensor at a time keeps peak memory at the model's size.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        size = path.stat().st_size
        try:
            with path.open("rb") as handle:
                header_len = int.from_bytes(handle.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError("header longer than the file")
                header = json.loads(handle.read(header_len))
            self._start = 8 + header_len
            self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
            for name, entry in self._entries.items():
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"unsupported dtype {entry['dtype']} of {name}")
                if self._start + end > size or begin > end:
                    raise ValueError(f"tensor {name} lies past the end of the file (truncated)")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise WeightsError(
                f"{path}: unreadable safetensors file ({first_line(error)})"
            ) from None

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=_SAFETENSORS_DTYPES[entry["dtype"]])
        buffer = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
        if buffer is not None and buffer.nbytes != end - begin:
            raise WeightsError(f"{self._path}: tensor {key} has an inconsistent size")
        if buffer is not None:
            with self._path.open("rb") as handle:
                handle.seek(self._start + begin)
                if handle.readinto(buffer) != buffer.nbytes:
                    raise WeightsError(f"{self._path}: truncated inside tensor {key}")
        return tensor

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self):
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def _is_torchscript_archive(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _read_torchscript(path: Path) -> StateDict:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise WeightsError(
            f"{path}: unreadable TorchScript archive ({first_line(error)})"
        ) from None
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _as_state_dict(loaded: object, path: Path) -> StateDict:
    if isinstance(loaded, Mapping) and "state_dict" in loaded and len(loaded) <= 4:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not loaded:
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    others = sorted(str(k) for k in loaded if k not in tensors)
    if others and set(others) - OPENAI_METADATA_KEYS:
        raise WeightsError(f"{path}: holds non-tensor entries {name_some(others)}")
    return tensors


def name_some(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
