"""The one table of CLIPSeg architectures and named models, and the names every layer shares.

Every dimension the model, the weight converters and the CLI need comes from here, and so do the
names of devices, precisions and refinements, and the defaults the options show. Facts are from
the CLIPSeg paper, the original repository (timojl/clipseg) and the transformers port; see
``../shared/CLIPSEG.md``. Standard library only: every module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

# Preprocessing of the reference implementation: ImageNet statistics, not CLIP's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The paper's default decision threshold on sigmoid probabilities.
DEFAULT_THRESHOLD = 0.3
DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
#: The Segment Anything model of ``--refine sam`` (transformers' SamModel layout).
DEFAULT_SAM_MODEL = "facebook/sam-vit-base"

#: ``--device`` values (besides ``cuda:N``); ``auto`` picks CUDA, then Apple MPS, then the CPU.
DEVICES = ("auto", "cpu", "cuda", "mps")
#: ``--precision`` values; ``auto`` is half precision on GPUs and, on the CPU, fp32 or native
#: bf16 as measured (clipseg_cli.backends.tuning); ``int8`` is the quantised graph (CPUs only).
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: What run summaries call each precision's number type (torch's dtype names; ``int8`` is the
#: ONNX graph's quantised weights).
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}
#: ``--backend`` values: ``auto`` is torch on GPUs and, on the CPU, ONNX Runtime or OpenVINO as
#: measured on the machine (clipseg_cli.backends.tuning).
BACKENDS = ("auto", "torch", "onnx", "openvino")
#: Edge refinement of probabilities against the full-resolution image: guided filter
#: (ops.matting) or Segment Anything (clipseg_cli.sam, the [sam] extra).
REFINE_METHODS = ("none", "guided", "sam")
#: Images per model batch when --batch-size is not given, by device type: on a CPU one image
#: (485 tokens) already keeps the cores busy, and each extra image costs ~50 MB of fp32
#: activations (measured on 2 cores: batches of 1 as fast as of 2, peak memory 60-100 MB lower);
#: GPUs need larger batches to be fed.
DEFAULT_BATCH_SIZES = {"cpu": 1, "cuda": 16, "mps": 4}
#: ``--min-area`` by default: regions below this share of the image's pixels are specks
#: (0.02%: 157 px on 1024x768, 629 px on 2048x1536, 2400 px on 4000x3000).
DEFAULT_MIN_AREA_FRACTION = 2e-4
#: ``--min-score`` by default: objects (instances) whose score, the mean probability inside, is
#: lower are specks, dropped from the masks, instances and exports (the paper's threshold plus
#: 0.1; chosen on tuning scenes by bench/instances_bench.py, which measures it on fresh ones).
DEFAULT_MIN_SCORE = 0.4
#: ``--split`` values: ``auto`` splits a region where touching objects meet (ops.split),
#: ``none`` keeps every region of the mask whole.
SPLIT_MODES = ("auto", "none")
#: ``--smooth`` for videos (ops.temporal): none, ema, or flow (EMA of the flow-warped past);
#: the default was chosen by measurement (bench/video_bench.py, docs/video.md).
SMOOTH_MODES = ("none", "ema", "flow")
DEFAULT_SMOOTH = "flow"
#: ``--video-codec``: the format of videos with alpha (matte, cutout), see io.video.
VIDEO_CODECS = ("prores", "vp9", "ffv1", "png")
#: ``--segment-frames``: a video's frames per ledger segment (the unit of resuming).
DEFAULT_SEGMENT_FRAMES = 300
#: Pillow's own default limit (``Image.MAX_IMAGE_PIXELS``): about 179 megapixels, ~0.5 GB as RGB.
DEFAULT_MAX_PIXELS = 178_956_970


def device_type(device: str) -> str:
    """``cuda:1`` -> ``cuda``; the kind of device a ``--device`` value names."""
    return device.split(":")[0]


def is_device_name(device: str) -> bool:
    """Whether ``device`` is one of :data:`DEVICES` or ``cuda:N``."""
    return device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit())


@dataclass(frozen=True)
class VisionSpec:
    """CLIP vision tower (ViT)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0
    # The positional embedding was trained for this size; other sizes resize it bicubically.
    pretrain_image_size: int = 224


@dataclass(frozen=True)
class TextSpec:
    """CLIP text tower."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408


@dataclass(frozen=True)
class DecoderSpec:
    """The CLIPSeg decoder: reduce -> FiLM -> post-norm transformer blocks -> transposed convs."""

    reduce_dim: int = 64
    heads: int = 4
    feedforward_dim: int = 2048
    # 0-based vision block indices whose outputs feed the decoder (the code's 3,6,9; the
    # paper's text says 3,7,9 but the released weights use 3,6,9).
    extract_layers: tuple[int, ...] = (3, 6, 9)
    # rd64-refined uses Conv3x3 -> ConvT(x4) -> ConvT(x4); rd64/rd16 one ConvT(x16).
    refined_head: bool = True


@dataclass(frozen=True)
class ArchitectureSpec:
    """Every dimension of a CLIPSeg model."""

    vision: VisionSpec = VisionSpec()
    text: TextSpec = TextSpec()
    decoder: DecoderSpec = DecoderSpec()
    embed_dim: int = 512
    input_size: int = 352

    @property
    def last_needed_layer(self) -> int:
        """Index of the deepest vision block the decoder reads; later blocks are never run."""
        return max(self.decoder.extract_layers)


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its architecture and where its weights live (the Hugging Face hub, or a
    folder shipped inside this package)."""

    name: str
    hub_id: str | None
    original_filename: str | None
    architecture: ArchitectureSpec
    description: str
    # Folder (transformers layout) relative to the clipseg_cli package, for bundled models.
    bundled: str | None = None
    # Said after every run with this model: what its masks can and cannot be trusted for.
    run_note: str | None = None


VIT_B16 = ArchitectureSpec()
# The offline demo model: a CLIPSeg trained from scratch on clipseg_cli.ops.shapes scenes by
# ``clipseg train --from-scratch tiny`` (see clipseg_cli/assets/demo/README.md). Small enough to
# train on two CPU cores in under half an hour and to ship in the package (fp16, < 10 MB, mostly
# the 49408 x 64 token embedding). 128 x 128 input: objects span 2-3 tokens, so that a ViT
# trained for minutes can learn their shape, not only their colour.
TINY = ArchitectureSpec(
    vision=VisionSpec(width=96, layers=10, heads=4, patch_size=16, pretrain_image_size=128),
    text=TextSpec(width=64, layers=3, heads=4),
    decoder=DecoderSpec(reduce_dim=64, heads=4, feedforward_dim=256),
    embed_dim=64,
    input_size=128,
)

MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="rd64-refined",
            hub_id="CIDAS/clipseg-rd64-refined",
            original_filename="rd64-uni-refined.pth",
            architecture=VIT_B16,
            description="reduce dim 64, refined (3-layer) head; sharpest masks",
        ),
        ModelSpec(
            name="rd64",
            hub_id="CIDAS/clipseg-rd64",
            original_filename="rd64-uni.pth",
            architecture=replace(VIT_B16, decoder=replace(DecoderSpec(), refined_head=False)),
            description="reduce dim 64, single transposed-conv head",
        ),
        ModelSpec(
            name="rd16",
            hub_id="CIDAS/clipseg-rd16",
            original_filename="rd16-uni.pth",
            architecture=replace(
                VIT_B16, decoder=replace(DecoderSpec(), reduce_dim=16, refined_head=False)
            ),
            description="reduce dim 16, single transposed-conv head; smallest decoder",
        ),
        ModelSpec(
            name="demo",
            hub_id=None,
            original_filename=None,
            architecture=TINY,
            description="offline demo: coloured shapes only (trained on synthetic scenes)",
            bundled="assets/demo",
            run_note="the demo model only knows coloured shapes (red, green, blue, yellow "
            "circles, squares, triangles); real photos need the real weights: --model "
            f"{DEFAULT_MODEL} (about 600 MB, downloaded on first use)",
        ),
    )
}
# Architectures ``clipseg train --from-scratch`` accepts besides the names above.
SCRATCH_ALIASES = {"tiny": "demo"}


def architecture_for(name: str) -> ArchitectureSpec:
    """The architecture of a named model (``tiny`` = the demo model's); KeyError with a
    one-line message otherwise."""
    spec = MODEL_SPECS.get(SCRATCH_ALIASES.get(name, name))
    if spec is None:
        known = ", ".join([*SCRATCH_ALIASES, *MODEL_SPECS])
        raise KeyError(f"unknown architecture {name!r} (known: {known})")
    return spec.architecture


def variant_name(arch: ArchitectureSpec) -> str:
    """The named model an architecture is (``rd64-refined``), or ``custom``."""
    for spec in MODEL_SPECS.values():
        if spec.architecture == arch:
            return spec.name
    known = spec_for_decoder(arch.decoder.reduce_dim, arch.decoder.refined_head)
    return known.name if known and known.architecture == arch else "custom"


def architecture_to_dict(arch: ArchitectureSpec) -> dict:
    """The architecture as plain JSON-able data (tuples as lists)."""
    return {
        "vision": vars(arch.vision).copy(),
        "text": vars(arch.text).copy(),
        "decoder": {**vars(arch.decoder), "extract_layers": list(arch.decoder.extract_layers)},
        "embed_dim": arch.embed_dim,
        "input_size": arch.input_size,
    }


def architecture_from_dict(data: dict) -> ArchitectureSpec:
    """:func:`architecture_to_dict` inverted.

    Raises:
        TypeError, KeyError: not such a dict.
    """
    decoder = dict(data["decoder"])
    decoder["extract_layers"] = tuple(decoder["extract_layers"])
    return ArchitectureSpec(
        vision=VisionSpec(**data["vision"]),
        text=TextSpec(**data["text"]),
        decoder=DecoderSpec(**decoder),
        embed_dim=int(data["embed_dim"]),
        input_size=int(data["input_size"]),
    )


def spec_for_decoder(reduce_dim: int, refined_head: bool) -> ModelSpec | None:
    """The released variant whose decoder has these properties (variant detection)."""
    for spec in MODEL_SPECS.values():
        decoder = spec.architecture.decoder
        if decoder.reduce_dim == reduce_dim and decoder.refined_head == refined_head:
            return spec
    return None


def resolve_model(model: str) -> tuple[str, Path | None]:
    """Classify a ``--model`` value: ("dir"|"file", path) or ("hub", None) with its repo id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return "dir", path
    if path.is_file():
        return "file", path
    return "hub", None
