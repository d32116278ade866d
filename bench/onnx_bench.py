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


def cpu_summary() -> list[str]:
    """lscpu's model name and the flags that matter for fp32/bf16/int8 GEMMs."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return [f"CPU: {platform.processor() or 'unknown'} (no lscpu)"]
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in text.splitlines())
    )
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
        + ", ".join(f"{flag} {'yes' if there else 'no'}" for flag, there in present.items()),
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


def gemm_rates(repeats: int) -> list[tuple[str, float]]:
    """GFLOP/s of fp32 GEMMs: 2048^3 and the ViT's MLP shape (485 x 768 x 3072)."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from clipseg_cli.backends.onnx import session_options

    rates = []
    shapes = {"2048x2048x2048": (2048, 2048, 2048), "485x768x3072 (ViT fc1)": (485, 768, 3072)}
    for label, (m, k, n) in shapes.items():
        flops = 2.0 * m * k * n
        a = torch.randn(m, k)
        b = torch.randn(k, n)
        rates.append(
            (f"torch.matmul {label}", flops / best_seconds(lambda a=a, b=b: a @ b, repeats) / 1e9)
        )
        an, bn = a.numpy(), b.numpy()
        rates.append(
            (
                f"numpy matmul {label}",
                flops / best_seconds(lambda an=an, bn=bn: an @ bn, repeats) / 1e9,
            )
        )
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            "gemm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
            initializer=[onnx.numpy_helper.from_array(bn, "b")],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        session = ort.InferenceSession(
            proto.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        )
        feed = {"a": an}
        rates.append(
            (
                f"ORT MatMul {label}",
                flops / best_seconds(lambda s=session, f=feed: s.run(None, f), repeats) / 1e9,
            )
        )
    return rates


class Rows:
    """The table's rows: (label, seconds per image, note)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def add(self, label: str, seconds: float, note: str = "") -> None:
        self.rows.append((label, seconds, note))
        print(f"  {label}: {seconds:.3f} s/img {note}", flush=True)

    def seconds(self, prefix: str) -> float:
        return next(s for label, s, _ in self.rows if label.startswith(prefix))


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
            "torch eager, mkldnn.matmul.fp32_precision=bf16", seconds, f"(rel. diff {err:.1e})"
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
        rows.add("torch eager bf16 (--precision bf16)", seconds, f"(rel. diff {err:.1e})")

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


def onnx_rows(rows: Rows, model, info, pixels, conditionals, reference, repeats: int) -> None:
    """ONNX Runtime fp32 with spinning on and off, int8 per channel and per tensor."""
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
        rows.add(label, seconds, f"(mask IoU vs fp32 at p > 0.5: {iou:.4f})")


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
    onnx_rows(rows, model, info, pixels, conditionals, reference, args.repeats)

    print("\nGEMM rates:")
    gemms = gemm_rates(repeats=10)
    for label, rate in gemms:
        print(f"  {label}: {rate:.0f} GFLOP/s")
    peak_label, peak = max(gemms, key=lambda item: item[1])

    torch_s = rows.seconds("torch eager fp32")
    print(f"\nbest fp32 GEMM here: {peak:.0f} GFLOP/s ({peak_label})\n")
    print(
        "| backend (batch 1, 352x352, 1 prompt) | s / image | img/s | vs torch eager | "
        "effective GFLOP/s | share of best fp32 GEMM | note |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, seconds, note in rows.rows:
        rate = total_flops / seconds / 1e9
        print(
            f"| {label} | {seconds:.3f} | {1 / seconds:.2f} | {torch_s / seconds:.2f}x | "
            f"{rate:.0f} | {rate / peak:.0%} | {note.strip('()')} |"
        )
    fp32_off = rows.seconds("ORT fp32, spinning off")
    int8_s = rows.seconds("ORT int8 (dynamic, per-channel")
    print(f"\nint8 (per-channel) vs fp32 (spinning off): {fp32_off / int8_s:.2f}x")
    demo_agreement()


if __name__ == "__main__":
    main()
