"""The options the commands share, each declared once: its flag, type, default and help.

A command lists them in its signature (Typer needs every parameter there) and passes each by
name to its config object, so ``--prompt`` can be followed from the command line to the model
one layer at a time. Choices are validated here by their type (``Literal``), the rest by the
config objects (one-line ``ValueError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from clipseg_cli.io.naming import COMMAND_KINDS
from clipseg_cli.specs import (
    BACKENDS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_THRESHOLD,
    DEVICES,
    MODEL_SPECS,
    PRECISIONS,
)

# -- inputs and outputs ---------------------------------------------------------------------------

Inputs = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders (recursive), quoted globs, '-' (paths on stdin) or "
        "@list.txt (a file of paths).",
        show_default=False,
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
LogOpt = Annotated[
    Path | None,
    typer.Option(help="JSON-lines log, one row per input (default: OUT/clipseg-log.jsonl)."),
]
ReportOpt = Annotated[
    bool, typer.Option(help="Write OUT/report.html: a static page to review every result.")
]
BitsOpt = Annotated[int, typer.Option(help="Bit depth of probability/alpha PNGs: 8 or 16.")]
SegmentSaveOpt = Annotated[
    list[str] | None,
    typer.Option(
        help=f"Output kinds, comma-separated or repeated: {', '.join(COMMAND_KINDS['segment'])}.",
        show_default=COMMAND_KINDS["segment"][0],
    ),
]
CutoutAlphaOpt = Annotated[
    str, typer.Option(help="Alpha of 'cutout' PNGs: soft (probability) or mask.")
]

# -- prompts --------------------------------------------------------------------------------------

PromptOpt = Annotated[
    list[str] | None, typer.Option("--prompt", "-p", help="Text prompt (repeatable).")
]
PromptsFileOpt = Annotated[Path | None, typer.Option(help="File with one text prompt per line.")]
RefOpt = Annotated[
    list[Path] | None,
    typer.Option(
        help="Image prompt: a support image of the object (repeatable: averaged into one)."
    ),
]
RefMaskOpt = Annotated[
    list[Path] | None,
    typer.Option(help="Object mask of the n-th --ref (else the reference's alpha, if any)."),
]
RefModeOpt = Annotated[
    Literal["raw", "engineered"] | None,
    typer.Option(
        help="engineered: crop around the object, background dimmed to 10% and blurred "
        "(default with a mask); raw: the whole image as it is (default without).",
        show_default=False,
    ),
]
MixOpt = Annotated[
    float | None, typer.Option(help="Combine text and image prompts: W*text + (1-W)*image.")
]
NegativeOpt = Annotated[
    list[str] | None,
    typer.Option(help="Suppress what matches this text: p * (1 - max p_negative). Repeatable."),
]
SavePromptOpt = Annotated[
    Path | None, typer.Option(help="Write the embedded prompts to FILE for --prompt-embedding.")
]
PromptEmbeddingOpt = Annotated[
    Path | None,
    typer.Option(help="Use prompts saved by --save-prompt (no text tower or reference needed)."),
]

# -- decisions ------------------------------------------------------------------------------------

ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        help=f"Probability above which a pixel is foreground (default: {DEFAULT_THRESHOLD}, the "
        "paper's).",
        show_default=False,
    ),
]
ThresholdFromOpt = Annotated[
    Path | None, typer.Option(help="Read the threshold from a file written by clipseg calibrate.")
]

# -- sharper masks --------------------------------------------------------------------------------

RefineOpt = Annotated[
    Literal["none", "guided", "sam"],
    typer.Option(
        help="Edge refinement of every output made from the probability (not logits) against "
        "the full-resolution image: guided (guided filter), none (plain upsampled "
        "probabilities), or sam (Segment Anything per region: pip install 'clipseg-cli[sam]')."
    ),
]
TilesOpt = Annotated[
    str,
    typer.Option(
        help="Look closer at large images: off, auto (when the shorter side is at least twice "
        "the model's input), or N tiles along the shorter side; combined with the whole image."
    ),
]
SamModelOpt = Annotated[
    str,
    typer.Option(
        help="Segment Anything model for --refine sam: a hub id or a local transformers folder."
    ),
]

# -- mask shaping and dataset exports -------------------------------------------------------------

GrowOpt = Annotated[
    int, typer.Option(help="Grow the mask by PX pixels (negative: shrink), with a disc.")
]
FillHolesOpt = Annotated[bool, typer.Option(help="Fill the holes of every region of the mask.")]
MinAreaOpt = Annotated[
    int | None,
    typer.Option(
        help="Drop regions (and instances) smaller than PX pixels (default: 0.02% of the image).",
        show_default=False,
    ),
]
MinScoreOpt = Annotated[
    float,
    typer.Option(
        help="Drop objects scored below S (the mean probability of their pixels above the "
        "threshold) from the mask, the instances and the exports; 0 keeps every region."
    ),
]
SplitOpt = Annotated[
    Literal["auto", "none"],
    typer.Option(help="Split regions where touching objects meet (auto) or keep them whole."),
]
InvertOpt = Annotated[bool, typer.Option(help="Everything but the prompt (background removal).")]
FeatherOpt = Annotated[
    int, typer.Option(help="Soft edge of PX pixels for soft outputs, mattes and cutouts.")
]
ExportOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Dataset exports built from the instances of every image: coco (OUT/coco.json), "
        "yolo (OUT/yolo/); comma-separated or repeated.",
        show_default=False,
    ),
]
CocoSegmentationOpt = Annotated[
    Literal["rle", "polygon"],
    typer.Option(help="COCO segmentations: rle (exact, compressed) or polygon."),
]
YoloCopyOpt = Annotated[
    bool, typer.Option(help="Copy the images into OUT/yolo/images instead of linking them.")
]

# -- the model and the machine --------------------------------------------------------------------

ModelOpt = Annotated[
    str,
    typer.Option(
        help=f"Hub id, short name ({', '.join(MODEL_SPECS)}), local transformers folder, "
        "or original decoder file (.pth)."
    ),
]
ClipWeightsOpt = Annotated[
    Path | None,
    typer.Option(help="OpenAI-format CLIP ViT-B/16 weights for an original decoder file."),
]
DeviceOpt = Annotated[str, typer.Option(help=f"{', '.join(DEVICES)} or cuda:N.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help=f"{', '.join(PRECISIONS)} (auto: half precision on GPU; on the CPU the fastest of "
        "fp32 and native bf16 whose masks agree with fp32's, measured once per machine; fp32: "
        "exact; int8: the quantised graph, CPU only, opt-in)."
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        help=f"{', '.join(BACKENDS)}: what runs the model (auto: torch on GPUs; on the CPU "
        "ONNX Runtime or OpenVINO, whichever is fastest here, measured once: see clipseg tune)."
    ),
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        help=f"Images per model batch (default: {DEFAULT_BATCH_SIZES['cpu']} on CPU, "
        f"{DEFAULT_BATCH_SIZES['cuda']} on GPU).",
        show_default=False,
    ),
]
WorkersOpt = Annotated[int, typer.Option(help="Decode/resize worker threads.")]
ProgressOpt = Annotated[
    Literal["auto", "bar", "lines", "none"],
    typer.Option(help="auto (bar on a terminal, lines otherwise), bar, lines, none."),
]

# -- hostile inputs and reruns --------------------------------------------------------------------

MaxPixelsOpt = Annotated[
    int, typer.Option(help="Refuse images with more pixels than this (decompression bombs).")
]
TruncatedOpt = Annotated[bool, typer.Option(help="Decode truncated files instead of failing them.")]
OverwriteOpt = Annotated[
    bool, typer.Option(help="Redo everything when --out holds results of another configuration.")
]
RetryOpt = Annotated[
    bool, typer.Option(help="Retry inputs that failed in earlier runs into the same --out.")
]

# -- videos (docs/video.md) ----------------------------------------------------------------------

SmoothOpt = Annotated[
    Literal["none", "ema", "flow"],
    typer.Option(
        help="Videos: steady the probabilities over time: flow (average with the past warped "
        "by optical flow), ema (plain average) or none."
    ),
]
VideoCodecOpt = Annotated[
    Literal["prores", "vp9", "ffv1", "png"],
    typer.Option(
        help="Videos with alpha (matte, cutout): prores (ProRes 4444 .mov), vp9 (.webm), "
        "ffv1 (lossless .mkv) or png (a folder of frames)."
    ),
]
EveryOpt = Annotated[int, typer.Option(help="Videos: keep every N-th frame.")]
FpsOpt = Annotated[
    float | None,
    typer.Option(
        help="Videos: keep at most F frames a second; a --sequence's frame rate (default 25).",
        show_default=False,
    ),
]
StartOpt = Annotated[
    float | None, typer.Option(help="Videos: start at this second.", show_default=False)
]
EndOpt = Annotated[
    float | None, typer.Option(help="Videos: end before this second.", show_default=False)
]
SegmentFramesOpt = Annotated[
    int, typer.Option(help="Videos: frames per segment, the unit a killed run resumes from.")
]
FramesOpt = Annotated[
    bool, typer.Option(help="Videos: also write every frame's outputs as PNG files.")
]
SequenceOpt = Annotated[
    bool, typer.Option(help="A folder of numbered frames is one video (rate from --fps).")
]

# -- Ray ------------------------------------------------------------------------------------------

EngineOpt = Annotated[
    Literal["local", "ray"],
    typer.Option(
        help="local (this machine) or ray (a Ray cluster: pip install 'clipseg-cli[ray]'; "
        "see docs/ray.md)."
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster to join (auto, ray://host:10001, host:6379) (default: $RAY_ADDRESS, "
        "else a local cluster started for the run).",
        show_default=False,
    ),
]
NumGpusOpt = Annotated[
    float | None,
    typer.Option(
        help="GPUs per Ray actor (fractions share a GPU) (default: 1 if the cluster has GPUs, "
        "else 0).",
        show_default=False,
    ),
]
ActorsOpt = Annotated[
    int | None,
    typer.Option(
        help="Ray actors holding the model (default: one per GPU, else one per 8 CPUs).",
        show_default=False,
    ),
]


# -- reading what options name --------------------------------------------------------------------


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are ignored.

    Raises:
        ValueError: the file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompts-file {path}: cannot read ({error})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def prompts_from(prompt: list[str] | None, prompts_file: Path | None) -> tuple[str, ...]:
    """``--prompt`` texts, then those of ``--prompts-file``."""
    prompts = list(prompt or [])
    if prompts_file is not None:
        prompts += read_prompts_file(prompts_file)
    return tuple(prompts)


def threshold_from(threshold: float | None, threshold_file: Path | None) -> float:
    """``--threshold``, or the one ``--threshold-from`` names, or the paper's default.

    Raises:
        ValueError: both are given, or the file holds no valid threshold.
    """
    if threshold is not None and threshold_file is not None:
        raise ValueError("give --threshold or --threshold-from, not both")
    if threshold_file is not None:
        from clipseg_cli.evaluate.calibration import read_threshold_file

        return read_threshold_file(threshold_file)
    return DEFAULT_THRESHOLD if threshold is None else threshold
