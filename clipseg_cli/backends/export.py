"""Exporting the image side of a :class:`ClipSegModel` to an ONNX graph (torch's dynamo-based
exporter, ``torch.onnx.export(dynamo=True)``, which needs ``onnxscript``).

The graph: inputs ``pixels`` uint8 ``[B, S, S, 3]`` (decoded RGB bytes; ImageNet normalisation is
inside the graph) and ``conditionals`` float32 ``[K, D]``; output ``logits`` float32
``[B, K, S, S]``; B and K dynamic, S fixed to the model's input size. float32 only. Only what
segmentation runs is in it: the patch embedding, blocks 0 .. max(extract_layers) and the decoder
(the text tower, blocks after the deepest extracted one and the image head are never traced, so
the exporter drops their weights; ~290 MB for ViT-B/16).

The text graph (:func:`export_text_graph_bytes`): ``tokens`` int64 ``[K, L]`` -> ``conditionals``
float32 ``[K, D]``, the text tower alone, so that new text prompts are embedded without torch.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from clipseg_cli.backends.base import BackendError
from clipseg_cli.backends.cache import OPSET
from clipseg_cli.backends.torch import ImageGraphModule, TextGraphModule
from clipseg_cli.errors import first_line
from clipseg_cli.io.files import write_bytes_atomic
from clipseg_cli.model.clipseg import ClipSegModel

INPUT_NAMES = ("pixels", "conditionals")
OUTPUT_NAMES = ("logits",)
TEXT_INPUT_NAMES = ("tokens",)
TEXT_OUTPUT_NAMES = ("conditionals",)


def export_image_graph_bytes(model: ClipSegModel) -> bytes:
    """The serialised fp32 ONNX graph (``ModelProto`` bytes) of ``model``'s image side.

    The model must be float32 (on any device: it is traced where it is, and left in the
    train/eval mode it had).

    Raises:
        ValueError: the model is not float32.
        BackendError: the exporter failed (one line).
    """
    if model.dtype != torch.float32:
        raise ValueError(f"the ONNX graph is exported from a float32 model, not {model.dtype}")
    arch = model.arch
    size = arch.input_size
    # Example inputs with B, K >= 2: the exporter specialises dimensions of size 0 and 1.
    device = model.pixel_mean.device
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=generator)
    conditionals = torch.randn(3, arch.embed_dim, generator=generator)
    pixels, conditionals = pixels.to(device), conditionals.to(device)
    batch = torch.export.Dim("batch", min=1)
    prompts = torch.export.Dim("prompts", min=1)
    return _export(
        ImageGraphModule(model),
        (pixels, conditionals),
        INPUT_NAMES,
        OUTPUT_NAMES,
        {"pixels": {0: batch}, "conditionals": {0: prompts}},
    )


def export_text_graph_bytes(model: ClipSegModel) -> bytes:
    """The serialised fp32 ONNX graph of ``model``'s text tower: ``tokens`` int64 ``[K, L]``
    (L the context length, fixed) -> ``conditionals`` float32 ``[K, D]``, K dynamic; exactly
    :meth:`ClipSegModel.encode_text` (pooled at the end-of-text token, projected, not
    normalised), what ``Segmenter.embed_texts`` returns on a float32 model.

    Only the text tower is traced: load the model with ``components={"text"}`` so that nothing
    else is even read (~250 MB of the graph for ViT-B/16's text tower).

    Raises:
        ValueError: the model is not float32.
        BackendError: the exporter failed (one line).
    """
    if model.dtype != torch.float32:
        raise ValueError(f"the ONNX graph is exported from a float32 model, not {model.dtype}")
    text = model.arch.text
    device = model.pixel_mean.device
    # K = 3 (the exporter specialises sizes 0 and 1); ids below the end-of-text id, which
    # closes each row where the tokenizer puts it.
    generator = torch.Generator().manual_seed(0)
    tokens = torch.zeros(3, text.context_length, dtype=torch.int64)
    tokens[:, 0] = text.vocab_size - 2
    for row, length in enumerate((2, 5, text.context_length - 1)):
        tokens[row, 1:length] = torch.randint(
            1, text.vocab_size - 2, (length - 1,), generator=generator
        )
        tokens[row, length] = text.vocab_size - 1
    prompts = torch.export.Dim("prompts", min=1)
    return _export(
        TextGraphModule(model),
        (tokens.to(device),),
        TEXT_INPUT_NAMES,
        TEXT_OUTPUT_NAMES,
        {"tokens": {0: prompts}},
    )


def _export(module, args, input_names, output_names, dynamic_shapes) -> bytes:
    """``torch.onnx.export(dynamo=True)`` of ``module`` at :data:`OPSET`, in eval mode and
    without gradients, as ``ModelProto`` bytes; every exporter failure is a one-line
    :class:`BackendError`."""
    model = module.model
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The exporter's own deprecation and tracing notes are not the user's concern.
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                optimize=True,
                verbose=False,
                report=False,
            )
            if program is None:
                raise BackendError("the ONNX exporter returned no program")
            return program.model_proto.SerializeToString()
    except BackendError:
        raise
    except Exception as error:  # the exporter raises many kinds; each is "export failed"
        raise BackendError(f"the ONNX export failed ({first_line(error)})") from error
    finally:
        model.train(was_training)


def export_image_graph(model: ClipSegModel, path: str | Path) -> Path:
    """Export ``model``'s image side to ``path`` (written atomically); returns the path.

    See :func:`export_image_graph_bytes` for what the graph holds and what is raised.
    """
    path = Path(path)
    write_bytes_atomic(path, export_image_graph_bytes(model))
    return path


def timed_export(model: ClipSegModel) -> tuple[bytes, float]:
    """:func:`export_image_graph_bytes` and the seconds it took."""
    start = time.perf_counter()
    data = export_image_graph_bytes(model)
    return data, time.perf_counter() - start


def timed_text_export(model: ClipSegModel) -> tuple[bytes, float]:
    """:func:`export_text_graph_bytes` and the seconds it took."""
    start = time.perf_counter()
    data = export_text_graph_bytes(model)
    return data, time.perf_counter() - start
