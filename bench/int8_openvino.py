"""OpenVINO's int8 options, measured: an NNCF static int8 of the fp32 image graph against ONNX
Runtime's dynamic int8 graph compiled by OpenVINO, each for speed (batch 1, one prompt) and
mask agreement with OpenVINO fp32 (backends.tuning.agreement, on its calibration input).

Usage: ``python bench/int8_openvino.py GRAPH.onnx [--scenes 64]`` where GRAPH is a cached fp32
image graph (``$CLIPSEG_CACHE/graphs/*.onnx`` whose sidecar says ``fp32``). Needs
``pip install nncf`` (not a dependency of clipseg). Prints the CPU's flags first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clipseg_cli.backends.quantize import quantize_int8
from clipseg_cli.backends.tuning import agreement, calibration_input
from clipseg_cli.ops.shapes import make_scene

CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def timed(compiled, pixels: np.ndarray, conditionals: np.ndarray) -> tuple[np.ndarray, float]:
    """(logits of every calibration image, median seconds of 3 one-image calls)."""
    request = compiled.create_infer_request()
    outs = []
    for i in range(len(pixels)):
        request.infer({"pixels": pixels[i : i + 1], "conditionals": conditionals})
        outs.append(np.array(request.get_output_tensor(0).data))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        request.infer({"pixels": pixels[:1], "conditionals": conditionals[:1]})
        times.append(time.perf_counter() - start)
    return np.concatenate(outs), float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graph", type=Path)
    parser.add_argument("--scenes", type=int, default=64, help="NNCF calibration scenes")
    args = parser.parse_args()
    import nncf

    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((line for line in flags.splitlines() if line.startswith("Model name")), ""))
    wanted = ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx2")
    print("flags:", " ".join(flag for flag in wanted if f" {flag}" in flags))
    core = ov.Core()
    pixels, conditionals = calibration_input(352, 512)
    compiled = core.compile_model(str(args.graph), "CPU", CONFIG)
    reference, fp32 = timed(compiled, pixels, conditionals)
    print(f"openvino fp32: {fp32:.3f} s/img")
    data = [
        {
            "pixels": make_scene(100 + i, 352).image[None].astype(np.uint8),
            "conditionals": conditionals[i % 3 : i % 3 + 1],
        }
        for i in range(args.scenes)
    ]
    start = time.perf_counter()
    static = nncf.quantize(
        core.read_model(str(args.graph)),
        nncf.Dataset(data),
        subset_size=len(data),
        model_type=nncf.ModelType.TRANSFORMER,
    )
    calibration = time.perf_counter() - start
    logits, seconds = timed(core.compile_model(static, "CPU", CONFIG), pixels, conditionals)
    iou, error = agreement(logits, reference)
    print(
        f"nncf static int8: {seconds:.3f} s/img, IoU {iou:.4f}, logit error {error:.4f}, "
        f"calibration {calibration:.0f} s on {args.scenes} scenes"
    )
    with tempfile.TemporaryDirectory() as folder:
        dynamic = Path(folder) / "int8.onnx"
        dynamic.write_bytes(quantize_int8(args.graph.read_bytes()))
        compiled = core.compile_model(str(dynamic), "CPU", CONFIG)
        logits, seconds = timed(compiled, pixels, conditionals)
    iou, error = agreement(logits, reference)
    print(f"onnx runtime dynamic int8 on openvino: {seconds:.3f} s/img, IoU {iou:.4f}, "
          f"logit error {error:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
