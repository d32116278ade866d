"""What this machine's CPU is and can do, read without importing torch or a runtime: its model
name, its feature flags, the matrix units among them, and the cores this process may use.

The tuning cache (:mod:`.tuning`) is keyed by the model name and the matrix flags: a choice
measured on one CPU is never reused on another (the machines under this project have changed
between Zen 3, Zen 5 and AMX Xeons, and a bf16 choice is wrong on a CPU without native bf16).
"""

from __future__ import annotations

import os
import platform
from functools import cache
from importlib.util import find_spec
from pathlib import Path

#: Flags that decide which precision is fast: native bf16 (AVX512_BF16, AMX, Arm BF16), int8
#: dot products (VNNI, AMX int8, Arm dotprod/i8mm), fp16 (AVX512_FP16), and the vector width.
MATRIX_FLAGS = frozenset(
    {
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "avx512_fp16",
        "avx_vnni",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
        "amx_fp16",
        "asimddp",
        "i8mm",
        "bf16",
        "sve",
    }
)


def _cpuinfo_lines() -> list[str]:
    try:
        with Path("/proc/cpuinfo").open() as handle:
            return handle.read().splitlines()
    except OSError:
        return []


@cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as the kernel reports them (Linux), or None where unknown."""
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return None


@cache
def cpu_model() -> str:
    """The CPU's model name (``Intel(R) Xeon(R) Processor``), or the platform's guess."""
    for line in _cpuinfo_lines():
        if line.startswith(("model name", "Model name", "Hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def matrix_flags() -> tuple[str, ...]:
    """The flags of :data:`MATRIX_FLAGS` this CPU has, sorted (empty where unknown)."""
    return tuple(sorted((cpu_flags() or frozenset()) & MATRIX_FLAGS))


def native_bf16() -> bool | None:
    """Whether the CPU computes bf16 natively (AVX512_BF16 or AMX on x86, BF16 on Arm), from
    its flags; None where they cannot be read."""
    flags = cpu_flags()
    if flags is None:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def runtime_available(runtime: str) -> bool:
    """Whether a CPU runtime's Python package (``onnx``: onnxruntime, ``openvino``) is
    installed: found, not imported."""
    module = {"onnx": "onnxruntime", "openvino": "openvino"}[runtime]
    return find_spec(module) is not None
