"""How fast the image side runs on this CPU: torch eager and its alternatives, ONNX Runtime fp32
(worker threads spinning or sleeping) and int8, against the best fp32 GEMM any library reaches
here. Not a test: prints the CPU, then a markdown table.

Full-size random rd64-refined weights (tests/factories.py), fp32, batch 1, 352x352, one prompt;
seconds per image are the best of ``--repeats`` calls after a warm-up call. The model's FLOPs
are counted from the architecture (conv patch embedding, blocks 0-9, decoder, head): ~76 GFLOP
through block 9 per ../shared/CLIPSEG.md, plus the decoder.

    .venv/bin/python bench/onnx_bench.py [--work /tmp/clipseg-onnx-bench] [--skip-compile]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def lscpu_fields() -> dict[str, str]:
    """lscpu's "key: value" lines ({} where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in text.splitlines())
    )


def native_bf16(flags: set[str]) -> bool:
    """Whether the CPU computes bf16 natively (the issue's rule, as the backend's
    machine.native_bf16): AVX512_BF16 or AMX-BF16 among the flags."""
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_summary() -> list[str]:
    """lscpu's model name, the flags that matter for fp32/bf16/int8 GEMMs, and all flags."""
    fields = lscpu_fields()
    if not fields:
        return [f"CPU: {platform.processor() or 'unknown'} (no lscpu)"]
    flags = set(fields.get("Flags", "").split())
    wanted = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_bf16",
        "amx_int8",
        "amx_tile",
    ]
    present = {flag: flag in flags for flag in wanted}
    return [
        f"CPU: {fields.get('Model name', '?')} ({fields.get('CPU(s)', '?')} CPUs, "
        f"{os.cpu_count()} visible to Python)",
        "flags: "
        + ", ".join(f"{flag} {'yes' if there else 'no'}" for flag, there in present.items())
        + f"; native bf16: {'yes' if native_bf16(flags) else 'no'}",
        f"flags (full): {fields.get('Flags', '?')}",
    ]


def best_seconds(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def model_flops(arch) -> tuple[float, float]:
    """(vision FLOPs through the deepest extracted block, decoder + head FLOPs) per image and
    prompt, multiply-adds counted as 2."""
    vision = arch.vision
    grid = arch.input_size // vision.patch_size
    tokens = 1 + grid * grid
    width = vision.width
    mlp = int(width * vision.mlp_ratio)
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
    patch = 2 * grid * grid * 3 * vision.patch_size**2 * width
    blocks = arch.last_needed_layer + 1
    vision_flops = patch + blocks * per_block

    dec = arch.decoder
    d = dec.reduce_dim
    layers = len(dec.extract_layers)
    decoder_flops = layers * 2 * tokens * width * d  # the reduces
    decoder_flops += layers * (
        2 * tokens * (4 * d * d + 2 * d * dec.feedforward_dim) + 2 * 2 * tokens * tokens * d
    )
    pixels = grid * grid
    if dec.refined_head:
        decoder_flops += 2 * pixels * d * d * 9  # conv 3x3
        decoder_flops += 2 * pixels * d * (d // 2) * 16  # ConvT x4
        decoder_flops += 2 * pixels * 16 * (d // 2) * 16  # ConvT x4 on the 4x grid
    else:
        decoder_flops += 2 * pixels * d * vision.patch_size**2
    return float(vision_flops), float(decoder_flops)


# The precisions a GEMM rate is measured in, and the unit each is counted in (multiply-add = 2).
GEMM_PRECISIONS = ("fp32", "bf16", "int8")
GEMM_SHAPES = {"2048x2048x2048": (2048, 2048, 2048), "485x768x3072 (ViT fc1)": (485, 768, 3072)}


# The ViT's MLP (485 tokens of ViT-B/16 at 352 px, width 768, 3072) and a large square GEMM.
GEMM_SHAPES = {"485x768x3072 (ViT fc1)": (485, 768, 3072), "2048x2048x2048": (2048, 2048, 2048)}


def _onnx_session(nodes, inputs, outputs, initializers):
    """An ONNX Runtime CPU session (the project's session options) on a one-node graph."""
    import onnxruntime as ort
    from onnx import helper

    from clipseg_cli.backends.onnx import session_options

    graph = helper.make_graph(nodes, "gemm", inputs, outputs, initializer=initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ort.InferenceSession(
        proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )


def _openvino_matmul(an: np.ndarray, bn: np.ndarray, precision: str | None, quantize: bool = False):
    """An OpenVINO infer request for ``a @ B`` (B constant), compiled for the CPU with
    ``INFERENCE_PRECISION_HINT`` = ``precision`` (None: the CPU plugin's default); with
    ``quantize``, both operands go through FakeQuantize (256 levels, symmetric, per tensor),
    which OpenVINO's low-precision transformations turn into an int8 MatMul (VNNI or AMX where
    the CPU has them)."""
    import openvino as ov
    from openvino import opset13 as ops

    a = ops.parameter(list(an.shape), ov.Type.f32, name="a")
    left, right = a.output(0), ops.constant(bn).output(0)
    if quantize:

        def fake_quantize(node, bound: float):
            low, high = ops.constant(np.float32(-bound)), ops.constant(np.float32(bound))
            return ops.fake_quantize(node, low, high, low, high, 256).output(0)

        left = fake_quantize(left, float(np.abs(an).max()))
        right = fake_quantize(right, float(np.abs(bn).max()))
    model = ov.Model([ops.matmul(left, right, False, False)], [a])
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    return lambda: request.infer({0: an}, share_inputs=True)


def _onnx_matmul_fp32(an: np.ndarray, bn: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    m, k = an.shape
    session = _onnx_session(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, bn.shape[1]])],
        [numpy_helper.from_array(bn, "b")],
    )
    return lambda: session.run(None, {"a": an})


def _onnx_integer(au: np.ndarray, bs: np.ndarray, qlinear: bool):
    """ONNX Runtime's MatMulInteger (u8 x s8 -> s32) or QLinearMatMul (u8 x s8 -> u8)."""
    from onnx import TensorProto, helper, numpy_helper

    m, k = au.shape
    n = bs.shape[1]
    inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])]
    weights = [numpy_helper.from_array(bs, "b")]
    if not qlinear:
        out = helper.make_tensor_value_info("c", TensorProto.INT32, [m, n])
        session = _onnx_session(
            [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], inputs, [out], weights
        )
        return lambda: session.run(None, {"a": au})
    constants = {
        "a_scale": np.float32(0.02),
        "a_zero": np.uint8(128),
        "b_scale": np.float32(0.01),
        "b_zero": np.int8(0),
        "y_scale": np.float32(50.0),
        "y_zero": np.uint8(128),
    }
    names = ["a", "a_scale", "a_zero", "b", "b_scale", "b_zero", "y_scale", "y_zero"]
    session = _onnx_session(
        [helper.make_node("QLinearMatMul", names, ["c"])],
        inputs,
        [helper.make_tensor_value_info("c", TensorProto.UINT8, [m, n])],
        weights + [numpy_helper.from_array(np.asarray(v), name) for name, v in constants.items()],
    )
    return lambda: session.run(None, {"a": au})


def _dynamic_int8_bytes(bn: np.ndarray, m: int) -> bytes:
    """A one-MatMul fp32 graph quantised by ONNX Runtime's ``quantize_dynamic`` (s8 weights,
    activations quantised per call: what the --precision int8 graph does)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    k, n = bn.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
        initializer=[numpy_helper.from_array(bn, "b")],
    )
    with tempfile.TemporaryDirectory() as folder:
        fp32_path, int8_path = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), fp32_path)
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
        return int8_path.read_bytes()


def _ort_dynamic_int8(an: np.ndarray, bn: np.ndarray):
    import onnxruntime as ort

    from clipseg_cli.backends.onnx import session_options

    graph = _dynamic_int8_bytes(bn, an.shape[0])
    session = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": an})


def _openvino_dynamic_int8(an: np.ndarray, bn: np.ndarray):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(_dynamic_int8_bytes(bn, an.shape[0]), b"")
    request = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    request = request.create_infer_request()
    return lambda: request.infer({0: an}, share_inputs=True)


def _gemm_candidates(m: int, k: int, n: int):
    """(label, precision, build) for every GEMM measured: ``build()`` sets it up and returns the
    call to time. fp32 and bf16 take f32 operands as the model's graph does (the bf16 ones
    convert inside); the integer ones take integer operands except where said."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    an, bn = a.numpy(), b.numpy()
    rng = np.random.default_rng(0)
    au = rng.integers(0, 256, (m, k), dtype=np.uint8)
    bs = rng.integers(-127, 128, (k, n), dtype=np.int8)
    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b8 = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    a16, b16 = a.bfloat16(), b.bfloat16()
    return [
        ("torch.matmul", "fp32", lambda: lambda: a @ b),
        ("numpy matmul", "fp32", lambda: lambda: an @ bn),
        ("ORT MatMul", "fp32", lambda: _onnx_matmul_fp32(an, bn)),
        ("OpenVINO MatMul (f32)", "fp32", lambda: _openvino_matmul(an, bn, "f32")),
        # oneDNN through OpenVINO: AMX or AVX512_BF16 where the CPU has them.
        (
            "OpenVINO MatMul (bf16 hint, f32 in/out)",
            "bf16",
            lambda: _openvino_matmul(an, bn, "bf16"),
        ),
        ("torch.matmul bf16", "bf16", lambda: lambda: a16 @ b16),
        ("ORT MatMulInteger (u8 x s8)", "int8", lambda: _onnx_integer(au, bs, qlinear=False)),
        ("ORT QLinearMatMul (u8 x s8)", "int8", lambda: _onnx_integer(au, bs, qlinear=True)),
        ("ORT dynamic int8 MatMul (f32 in)", "int8", lambda: _ort_dynamic_int8(an, bn)),
        (
            "OpenVINO on ORT's dynamic int8 MatMul (f32 in)",
            "int8",
            lambda: _openvino_dynamic_int8(an, bn),
        ),
        (
            "OpenVINO FakeQuantize'd MatMul (f32 in)",
            "int8",
            lambda: _openvino_matmul(an, bn, None, quantize=True),
        ),
        ("torch._int_mm (s8 x s8)", "int8", lambda: lambda: torch._int_mm(a8, b8)),
    ]


def gemm_rates(repeats: int) -> list[tuple[str, str, float]]:
    """(label, precision, rate) of the GEMMs each library offers, at the ViT's MLP shape
    (485 x 768 x 3072) and 2048^3: GFLOP/s for fp32 and bf16, GOP/s for int8 (multiply-add =
    2), best of ``repeats`` calls after a warm-up. A GEMM a library cannot run here (not
    installed, no kernel on this CPU) is skipped with one line on stderr."""
    rates = []
    for shape, (m, k, n) in GEMM_SHAPES.items():
        for name, precision, build in _gemm_candidates(m, k, n):
            try:
                seconds = best_seconds(build(), repeats)
            except Exception as error:  # one library's failure must not hide the others
                first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
                print(f"  ({name} {shape}: skipped, {first})", file=sys.stderr, flush=True)
                continue
            rates.append((f"{name} {shape}", precision, 2.0 * m * k * n / seconds / 1e9))
    return rates


def best_gemms(rates: list[tuple[str, str, float]]) -> dict[str, tuple[str, float]]:
    """The fastest (label, rate) of each precision in ``gemm_rates``' list."""
    best: dict[str, tuple[str, float]] = {}
    for label, precision, rate in rates:
        if precision not in best or rate > best[precision][1]:
            best[precision] = (label, rate)
    return best


class Rows:
    """The table's rows: (label, seconds per image, note)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str, str]] = []

    def add(self, label: str, seconds: float, note: str = "", precision: str = "fp32") -> None:
        """A row; ``precision`` is the GEMMs' (fp32, bf16, int8), for the share of the best."""
        self.rows.append((label, seconds, note, precision))
        print(f"  {label}: {seconds:.3f} s/img {note}", flush=True)

    def seconds(self, prefix: str) -> float:
        return next(s for label, s, _, _ in self.rows if label.startswith(prefix))


def _rel(out: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(out - reference).max() / np.abs(reference).max())


def torch_rows(rows: Rows, model, folder: Path, pixels, conditionals, args) -> np.ndarray:
    """torch eager fp32 and its alternatives; returns the fp32 reference logits."""
    import torch

    from clipseg_cli.backends.torch import ImageGraphModule, TorchImageBackend, image_logits
    from clipseg_cli.weights import load_weights

    repeats = args.repeats
    backend = TorchImageBackend(model, "cpu")
    rows.add(
        "torch eager fp32", best_seconds(lambda: backend.logits(pixels, conditionals), repeats)
    )
    reference = backend.logits(pixels, conditionals)
    pixels_t, cond_t = torch.from_numpy(pixels), torch.from_numpy(conditionals)

    # oneDNN for fp32 matmuls with bf16 math (avx512_bf16): the fp32 API, not fp32 accuracy.
    previous = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        seconds = best_seconds(lambda: backend.logits(pixels, conditionals), repeats)
        err = _rel(backend.logits(pixels, conditionals), reference)
        rows.add(
            "torch eager, mkldnn.matmul.fp32_precision=bf16",
            seconds,
            f"(rel. diff {err:.1e})",
            "bf16",
        )
    except Exception as error:  # report and go on
        print(f"  mkldnn fp32_precision=bf16: failed ({str(error).splitlines()[0][:120]})")
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous

    try:
        import copy

        import torch.utils.mkldnn

        mkldnn_model = torch.utils.mkldnn.to_mkldnn(copy.deepcopy(model))
        seconds = best_seconds(lambda m=mkldnn_model: image_logits(m, pixels_t, cond_t), repeats)
        err = _rel(image_logits(mkldnn_model, pixels_t, cond_t).numpy(), reference)
        rows.add(
            "torch eager, nn.Linear -> oneDNN (utils.mkldnn)", seconds, f"(rel. diff {err:.1e})"
        )
    except Exception as error:
        print(f"  torch.utils.mkldnn.to_mkldnn: failed ({str(error).splitlines()[0][:120]})")

    with torch.inference_mode():
        bf16 = load_weights(
            str(folder), components=frozenset({"vision", "decoder"}), dtype=torch.bfloat16
        )[0]
        seconds = best_seconds(lambda m=bf16: image_logits(m, pixels_t, cond_t), repeats)
        err = _rel(image_logits(bf16, pixels_t, cond_t).numpy(), reference)
        rows.add("torch eager bf16 (--precision bf16)", seconds, f"(rel. diff {err:.1e})", "bf16")

    if not args.skip_compile:
        try:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            compiled = torch.compile(ImageGraphModule(model).eval())
            start = time.perf_counter()
            with torch.no_grad():
                compiled(pixels_t, cond_t)
                compile_s = time.perf_counter() - start
                seconds = best_seconds(lambda: compiled(pixels_t, cond_t), repeats)
            rows.add("torch.compile (inductor, freezing)", seconds, f"(compile {compile_s:.0f} s)")
        except Exception as error:
            print(f"  torch.compile: failed ({str(error).splitlines()[0][:120]})")
    return reference


def onnx_rows(rows: Rows, model, info, pixels, conditionals, reference, repeats: int) -> Path:
    """ONNX Runtime fp32 with spinning on and off, int8 per channel and per tensor; returns
    the cached fp32 graph's path."""
    from clipseg_cli.backends.onnx import OnnxImageBackend, open_onnx_backend
    from clipseg_cli.backends.quantize import quantize_int8

    def say(message: str) -> None:
        print("  " + message)

    arch = model.arch
    start = time.perf_counter()
    load = open_onnx_backend(info.sha256, arch, lambda: model, label="bench model", on_progress=say)
    print(f"  fp32 graph ready in {time.perf_counter() - start:.1f} s (built: {load.built})")
    assert load.path is not None
    backends = {spin: OnnxImageBackend(load.path, spinning=spin) for spin in (True, False)}
    # Interleaved, so that a neighbour's load on the machine hits both alike.
    timings: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for spin, backend in backends.items():
            timings[spin].append(
                best_seconds(lambda b=backend: b.logits(pixels, conditionals), repeats)
            )
    for spin in (True, False):
        err = _rel(backends[spin].logits(pixels, conditionals), reference)
        label = f"ORT fp32, spinning {'on' if spin else 'off'}"
        rows.add(label, min(timings[spin]), f"(rel. diff to torch {err:.1e})")
    del backends

    start = time.perf_counter()
    int8 = open_onnx_backend(
        info.sha256, arch, lambda: model, variant="int8", label="bench model", on_progress=say
    )
    print(f"  int8 graph ready in {time.perf_counter() - start:.1f} s (built: {int8.built})")
    per_tensor = OnnxImageBackend(quantize_int8(load.path, per_channel=False))
    fp32_mask = reference > 0.0
    for label, backend in (
        ("ORT int8 (dynamic, per-channel weights: the cached variant)", int8.backend),
        ("ORT int8 (dynamic, per-tensor weights)", per_tensor),
    ):
        seconds = best_seconds(lambda b=backend: b.logits(pixels, conditionals), repeats)
        mask = backend.logits(pixels, conditionals) > 0.0
        iou = (mask & fp32_mask).sum() / max((mask | fp32_mask).sum(), 1)
        rows.add(label, seconds, f"(mask IoU vs fp32 at p > 0.5: {iou:.4f})", "int8")
    return load.path


def openvino_logits(graph: bytes | str | Path, precision: str):
    """The image graph compiled by OpenVINO for the CPU at ``precision`` (f32, bf16), as a
    function with the project's backends' interface (uint8 pixels, conditionals -> logits)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(graph, b"") if isinstance(graph, bytes) else core.read_model(graph)
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output("logits")

    def logits(pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
        result = request.infer({"pixels": pixels, "conditionals": conditionals})
        return np.asarray(result[output], dtype=np.float32)

    return logits


def openvino_rows(rows: Rows, fp32_graph: Path, pixels, conditionals, reference, repeats: int):
    """OpenVINO compiling the same cached graph: f32, bf16 (native on AVX512_BF16/AMX CPUs) and
    ONNX Runtime's dynamic int8 graph."""
    from clipseg_cli.backends.quantize import quantize_int8

    fp32_mask = reference > 0.0
    graphs = {
        "OpenVINO fp32": (fp32_graph, "f32", "fp32"),
        "OpenVINO bf16 (INFERENCE_PRECISION_HINT bf16)": (fp32_graph, "bf16", "bf16"),
        "OpenVINO on ORT's dynamic int8 graph": (quantize_int8(fp32_graph), "f32", "int8"),
    }
    for label, (graph, hint, precision) in graphs.items():
        try:
            run = openvino_logits(graph, hint)
        except Exception as error:
            print(f"  {label}: failed ({str(error).strip().splitlines()[0][:120]})")
            continue
        seconds = best_seconds(lambda r=run: r(pixels, conditionals), repeats)
        out = run(pixels, conditionals)
        mask = out > 0.0
        iou = (mask & fp32_mask).sum() / max((mask | fp32_mask).sum(), 1)
        note = f"(rel. diff {_rel(out, reference):.1e}, mask IoU vs fp32 at p > 0.5: {iou:.4f})"
        rows.add(label, seconds, note, precision)


def demo_agreement(scenes: int = 40) -> None:
    """int8 against fp32 on the bundled demo model: masks at t = 0.3 on shapes scenes (seeds
    from 10,000,000), one prompt per object in the scene; IoU summed over all masks."""
    from clipseg_cli.backends.export import export_image_graph_bytes
    from clipseg_cli.backends.onnx import OnnxImageBackend
    from clipseg_cli.backends.quantize import quantize_int8
    from clipseg_cli.ops.shapes import make_scene
    from clipseg_cli.segmenter import Segmenter

    segmenter = Segmenter.load("demo", device="cpu", precision="fp32")
    fp32_graph = export_image_graph_bytes(segmenter.model)
    fp32 = OnnxImageBackend(fp32_graph)
    size = segmenter.model.arch.input_size
    print(f"\ndemo model, int8 vs fp32, {scenes} scenes, t = 0.3:")
    for per_channel in (True, False):
        int8 = OnnxImageBackend(quantize_int8(fp32_graph, per_channel=per_channel))
        inter = union = gt_inter = gt_union = 0
        ious = []
        for i in range(scenes):
            scene = make_scene(10_000_000 + i, size)
            cond = segmenter.embed_texts([o.prompt for o in scene.objects]).numpy()
            a = fp32.logits(scene.image[None], cond)[0] > np.log(0.3 / 0.7)
            b = int8.logits(scene.image[None], cond)[0] > np.log(0.3 / 0.7)
            for k, obj in enumerate(scene.objects):
                i_, u_ = (a[k] & b[k]).sum(), (a[k] | b[k]).sum()
                inter, union = inter + i_, union + u_
                if u_:
                    ious.append(i_ / u_)
                gt_inter += (b[k] & obj.mask).sum()
                gt_union += (b[k] | obj.mask).sum()
        kind = "per-channel" if per_channel else "per-tensor"
        print(
            f"  {kind}: IoU vs fp32 {inter / union:.4f} (all masks pooled), mean per mask "
            f"{np.mean(ious):.4f}, worst mask {np.min(ious):.3f}; int8 vs ground truth IoU_FG "
            f"{gt_inter / gt_union:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "clipseg-onnx-bench"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()

    for line in cpu_summary():
        print(line)
    print()
    os.environ.setdefault("CLIPSEG_CACHE", str(args.work / "cache"))

    import torch
    from factories import save_random_hf_checkpoint

    from clipseg_cli.weights import load_weights

    folder = save_random_hf_checkpoint(args.work / "rd64-refined", size="full")
    model, info = load_weights(str(folder), components=frozenset({"vision", "decoder"}))
    arch = model.arch
    size = arch.input_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    conditionals = rng.standard_normal((1, arch.embed_dim)).astype(np.float32)
    vision_flops, decoder_flops = model_flops(arch)
    total_flops = vision_flops + decoder_flops
    print(f"threads: torch {torch.get_num_threads()}, ORT {os.cpu_count()} intra-op")
    print(
        f"model: {vision_flops / 1e9:.1f} GFLOP vision (blocks 0-{arch.last_needed_layer}) + "
        f"{decoder_flops / 1e9:.2f} GFLOP decoder per image and prompt\n"
    )

    rows = Rows()
    reference = torch_rows(rows, model, folder, pixels, conditionals, args)
    graph = onnx_rows(rows, model, info, pixels, conditionals, reference, args.repeats)
    openvino_rows(rows, graph, pixels, conditionals, reference, args.repeats)

    print("\nGEMM rates (GFLOP/s; GOP/s for int8):")
    gemms = gemm_rates(repeats=10)
    for label, precision, rate in gemms:
        print(f"  [{precision}] {label}: {rate:.0f}")
    best = best_gemms(gemms)
    for precision, (label, rate) in best.items():
        print(f"best {precision} GEMM here: {rate:.0f} ({label})")

    torch_s = rows.seconds("torch eager fp32")
    print()
    print(
        "| backend (batch 1, 352x352, 1 prompt) | s / image | img/s | vs torch eager | "
        "effective GFLOP/s | share of the best GEMM in its precision | note |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, seconds, note, precision in rows.rows:
        rate = total_flops / seconds / 1e9
        peak = best.get(precision, (None, None))[1]
        share = f"{rate / peak:.0%} of {precision} {peak:.0f}" if peak else "n/a"
        print(
            f"| {label} | {seconds:.3f} | {1 / seconds:.2f} | {torch_s / seconds:.2f}x | "
            f"{rate:.0f} | {share} | {note.strip('()')} |"
        )
    fp32_off = rows.seconds("ORT fp32, spinning off")
    int8_s = rows.seconds("ORT int8 (dynamic, per-channel")
    print(f"\nint8 (per-channel) vs fp32 (spinning off): {fp32_off / int8_s:.2f}x")
    demo_agreement()


if __name__ == "__main__":
    main()
