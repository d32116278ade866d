"""Precision names (:data:`clipseg_cli.specs.PRECISIONS`) as torch dtypes."""

from __future__ import annotations

import torch

#: Every torch precision: not ``auto`` (which :func:`clipseg_cli.segmenter.resolve_precision`
#: decides), nor ``int8`` (ONNX Runtime's quantised graph, :mod:`clipseg_cli.backends`).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16`` (as run summaries record it)."""
    return str(dtype).removeprefix("torch.")


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bf16`` (the ``--precision`` name)."""
    return {value: name for name, value in DTYPES.items()}[dtype]
