#!/usr/bin/env bash
# GPU benchmark: clipseg segment vs. the plain transformers script (see bench/gpu_bench.py).
#
# On a fresh NVIDIA machine, from a checkout of this repository:
#   bash bench/gpu_bench.sh                 # full run, about 8 minutes on an H200 after install
#   bash bench/gpu_bench.sh --quick         # fewer configurations, about 3 minutes
#   bash bench/gpu_bench.sh --model DIR     # real weights (a save_pretrained folder with processor)
# Every argument goes to bench/gpu_bench.py. Results: bench/_work/gpu/results.md and .json.
#
# Environment:
#   PYTHON           interpreter for the venv (default python3, needs >= 3.10)
#   VENV             venv folder (default .venv-gpu, reused when it already exists)
#   TORCH_INDEX_URL  install torch/torchvision from this index first, e.g.
#                    https://download.pytorch.org/whl/cu126 when the driver is too old for the
#                    CUDA build that PyPI's default torch wheel is linked against
set -euo pipefail

# pip install -e . and every path in gpu_bench.py are relative to the repository root.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv-gpu}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$VENV"
  # .gitignore only ignores .venv/; keep this venv out of `git status` too.
  echo '*' >"$VENV/.gitignore"
fi
PY="$VENV/bin/python"

"$PY" -m pip install --upgrade pip
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  "$PY" -m pip install torch torchvision --index-url "$TORCH_INDEX_URL"
fi
# pyproject.toml has no [dev] extra: [test] would add Ray, which the benchmark never runs, and
# [sam] is only transformers. transformers is what the reference script and the random-weights
# factory (tests/factories.py) import, so it is named directly.
"$PY" -m pip install -e . 'transformers>=4.40'

echo "== nvidia-smi"
# Tolerated when missing so that `--smoke` also runs on a CPU-only box; a real run stops later
# with a clear message when torch sees no CUDA device.
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
echo "== lscpu"
lscpu

exec "$PY" bench/gpu_bench.py "$@"
