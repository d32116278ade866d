"""bf16 and int8 against fp32: do the masks agree, and does the score against ground truth move?

Each candidate runs the same exported image graph (blocks 0-9 + decoder, the graph the CLI
caches) on the same inputs; its masks are compared with exact fp32's (ONNX Runtime fp32, equal
to torch's to ~1e-6), and both with the ground truth where there is one:

* **demo**: the bundled demo model on held-out shape scenes (clipseg_cli.ops.shapes, seeds from
  10,000,000 up; the model was trained on seeds 0..3199), one text prompt per object, embedded
  by the model's own text tower, masks at the paper's threshold 0.3. IoU_FG = TP / (TP + FP +
  FN) summed over all (scene, object) pairs, as tests/test_demo_model.py and ``clipseg eval``
  compute it.
* **random full-size**: random rd64-refined weights (tests/factories.py) on the same kind of
  scenes at 352 px, random conditional vectors, masks at 0.5 (random weights put every
  probability in 0.3-0.8, so 0.3 would mark every pixel). Against the ground truth these
  weights score nothing meaningful; what matters there is that a candidate's IoU_FG equals
  fp32's.

Candidates: OpenVINO fp32 and bf16 (the ONNX graph compiled with ``INFERENCE_PRECISION_HINT``;
bf16 is native only on CPUs with AVX512_BF16 or AMX-BF16, elsewhere OpenVINO computes f32),
ONNX Runtime int8 (the cached ``--precision int8`` graph: dynamic, per-channel weights),
OpenVINO's int8 (the fp32 graph with int8 weights: ``--backend openvino --precision int8``), and
torch bf16 (``--backend torch --precision bf16``).
IoU against fp32 is pooled (sum of intersections over sum of unions) and per mask (mean,
worst); logit error = max |logit - fp32 logit| over all pixels, and its 99.9th percentile.

Not a test: prints the CPU, then one Markdown table per model.

    .venv/bin/python bench/precision_agreement.py [--scenes 40] [--work /tmp/clipseg-agreement]
        [--skip-random]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO / "tests"))

from onnx_bench import cpu_summary, lscpu_fields, native_bf16, openvino_logits  # noqa: E402

HELD_OUT_SEED = 10_000_000
DEMO_THRESHOLD = 0.3
RANDOM_THRESHOLD = 0.5
Logits = Callable[[np.ndarray, np.ndarray], np.ndarray]


def candidates(model, graph: bytes) -> dict[str, Logits]:
    """Every candidate's logits function, fp32 (the reference) first."""
    import torch

    from clipseg_cli.backends.onnx import OnnxImageBackend
    from clipseg_cli.backends.openvino import OpenVinoImageBackend
    from clipseg_cli.backends.quantize import quantize_int8
    from clipseg_cli.backends.torch import image_logits

    int8_graph = quantize_int8(graph)
    found: dict[str, Logits] = {"ONNX Runtime fp32 (reference)": OnnxImageBackend(graph).logits}
    makers: dict[str, Callable[[], Logits]] = {
        "OpenVINO fp32": lambda: openvino_logits(graph, "f32"),
        "OpenVINO bf16": lambda: openvino_logits(graph, "bf16"),
        "ONNX Runtime int8 (dynamic, per-channel)": lambda: OnnxImageBackend(int8_graph).logits,
        "OpenVINO int8 weights (--backend openvino)": lambda: (
            OpenVinoImageBackend(graph, precision="int8").logits
        ),
    }
    for name, make in makers.items():
        try:
            found[name] = make()
        except Exception as error:  # one runtime's failure must not hide the others
            print(f"  {name}: unavailable ({str(error).strip().splitlines()[0][:160]})")
    bf16_model = _bf16_copy(model)

    def torch_bf16(pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = image_logits(bf16_model, torch.from_numpy(pixels), torch.from_numpy(conditionals))
        return out.float().numpy()

    found["torch bf16"] = torch_bf16
    return found


def _bf16_copy(model):
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16).eval()


@dataclass
class Tally:
    """One candidate's agreement with fp32 and with the ground truth, summed over the data."""

    inter: int = 0
    union: int = 0
    per_mask: list[float] = field(default_factory=list)
    max_error: float = 0.0
    errors: list[np.ndarray] = field(default_factory=list)
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, logits, reference, truths, threshold_logit: float) -> None:
        error = np.abs(logits - reference)
        self.max_error = max(self.max_error, float(error.max()))
        self.errors.append(error.ravel()[:: max(1, error.size // 20000)])
        for mask_logits, ref_logits, truth in zip(logits, reference, truths, strict=True):
            mask, ref = mask_logits > threshold_logit, ref_logits > threshold_logit
            i, u = int((mask & ref).sum()), int((mask | ref).sum())
            self.inter, self.union = self.inter + i, self.union + u
            self.per_mask.append(i / u if u else 1.0)
            if truth is not None:
                self.tp += int((mask & truth).sum())
                self.fp += int((mask & ~truth).sum())
                self.fn += int((~mask & truth).sum())

    def row(self, name: str) -> list[str]:
        p999 = float(np.quantile(np.concatenate(self.errors), 0.999)) if self.errors else 0.0
        iou_fg = self.tp / max(self.tp + self.fp + self.fn, 1)
        return [
            name,
            f"{self.inter / max(self.union, 1):.4f}",
            f"{np.mean(self.per_mask):.4f}",
            f"{np.min(self.per_mask):.3f}",
            f"{sum(iou < 0.9 for iou in self.per_mask)} of {len(self.per_mask)}",
            f"{self.max_error:.3g}",
            f"{p999:.3g}",
            f"{iou_fg:.4f}",
        ]


def measure(title: str, model, graph: bytes, inputs, threshold: float) -> list[str]:
    """Run every candidate over ``inputs`` ((pixels [1,S,S,3], conditionals [K,D], truths)) and
    return the Markdown table."""
    found = candidates(model, graph)
    logit_threshold = float(np.log(threshold / (1 - threshold)))
    tallies = {name: Tally() for name in found}
    for pixels, conditionals, truths in inputs:
        reference = None
        for name, logits_of in found.items():
            logits = logits_of(pixels, conditionals)[0]
            if reference is None:
                reference = logits
            tallies[name].add(logits, reference, truths, logit_threshold)
    lines = [
        f"### {title}",
        "",
        "| candidate | IoU vs fp32 (pooled) | mean per mask | worst mask | masks under 0.9 | "
        "max logit error | 99.9% logit error | IoU_FG vs ground truth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(t.row(name)) + " |" for name, t in tallies.items()]
    return [*lines, ""]


def demo_inputs(segmenter, scenes: int):
    from clipseg_cli.ops.shapes import make_scene

    size = segmenter.model.arch.input_size
    for i in range(scenes):
        scene = make_scene(HELD_OUT_SEED + i, size)
        conditionals = segmenter.embed_texts([o.prompt for o in scene.objects]).numpy()
        yield scene.image[None], conditionals, [o.mask for o in scene.objects]


def random_inputs(arch, scenes: int):
    from clipseg_cli.ops.shapes import make_scene

    rng = np.random.default_rng(0)
    for i in range(scenes):
        scene = make_scene(HELD_OUT_SEED + i, arch.input_size)
        conditionals = rng.standard_normal((len(scene.objects), arch.embed_dim)).astype(np.float32)
        yield scene.image[None], conditionals, [o.mask for o in scene.objects]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "clipseg-agreement"
    )
    parser.add_argument("--skip-random", action="store_true", help="only the demo model")
    args = parser.parse_args()
    lines = cpu_summary()
    print("\n".join(lines[:2]), flush=True)
    native = native_bf16(set(lscpu_fields().get("Flags", "").split()))
    if not native:
        print("(no native bf16 here: OpenVINO's bf16 hint computes f32, torch emulates bf16)")

    from factories import save_random_hf_checkpoint

    from clipseg_cli.backends.export import export_image_graph_bytes
    from clipseg_cli.segmenter import Segmenter
    from clipseg_cli.weights import load_weights

    out = [*lines[:2], ""]
    demo = Segmenter.load("demo", device="cpu", precision="fp32")
    table = measure(
        f"Bundled demo model, {args.scenes} held-out shape scenes, threshold {DEMO_THRESHOLD}",
        demo.model,
        export_image_graph_bytes(demo.model),
        list(demo_inputs(demo, args.scenes)),
        DEMO_THRESHOLD,
    )
    print("\n".join(table), flush=True)
    out += table
    if not args.skip_random:
        folder = save_random_hf_checkpoint(args.work / "rd64-refined", size="full")
        model, _ = load_weights(str(folder), components=frozenset({"vision", "decoder"}))
        table = measure(
            f"Random full-size rd64-refined weights, {args.scenes} shape scenes at "
            f"{model.arch.input_size} px, random conditionals, threshold {RANDOM_THRESHOLD}",
            model,
            export_image_graph_bytes(model),
            list(random_inputs(model.arch, args.scenes)),
            RANDOM_THRESHOLD,
        )
        print("\n".join(table), flush=True)
        out += table
    print("\n\n" + "\n".join(out))


if __name__ == "__main__":
    main()
