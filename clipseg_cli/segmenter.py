"""The Python API: a loaded CLIPSeg on a device, with its preprocessing.

Example::

    from clipseg_cli import Segmenter

    seg = Segmenter.load()  # CIDAS/clipseg-rd64-refined, best device
    cond = seg.embed_texts(["a dog", "a cat"])  # [2, 512]
    probs = seg.predict([rgb_array], cond)  # list of float32 [2, H, W] in [0, 1]

The CLI embeds prompts with these methods and, with ``--backend torch`` (the default on GPUs),
segments with the same model code; on the CPU it defaults to ONNX Runtime
(:mod:`clipseg_cli.backends`), which gives the same logits to 1e-4 of their magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.model.precision import DTYPES
from clipseg_cli.model.tokenizer import ClipTokenizer
from clipseg_cli.ops.transforms import probabilities_at_size, resize_rgb
from clipseg_cli.specs import DEFAULT_MODEL, DEVICES, PRECISIONS, is_device_name
from clipseg_cli.weights import COMPONENTS, WeightsInfo, load_weights


class ModelOptions(Protocol):
    """What a run's options say about the model: ``SegmentConfig`` and ``EvalConfig`` both
    have these fields, and :meth:`Segmenter.load_for` takes either."""

    model: str
    clip_weights: Path | None
    device: str
    precision: str


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU. Unavailable choices raise ValueError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not is_device_name(name):
        raise ValueError(f"--device {name}: expected {', '.join(DEVICES)} or cuda:N")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ValueError(f"--device {name}: this machine has {found}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple MPS is not available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto``: half precision on GPUs (bf16 where supported, else fp16), fp32 on the CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name == "int8":
        raise ValueError("--precision int8 is ONNX Runtime's graph: use --backend onnx")
    if name not in DTYPES:
        raise ValueError(f"--precision {name}: expected {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 is not supported on the CPU; use bf16 or fp32")
    return DTYPES[name]


class Segmenter:
    """A device-resident CLIPSeg with CLIPSeg's preprocessing around it."""

    def __init__(self, model: ClipSegModel, info: WeightsInfo, device: torch.device) -> None:
        self.model = model.to(device)
        self.info = info
        self.device = device
        self.dtype = model.dtype
        size = model.arch.input_size
        self.input_size: tuple[int, int] = (size, size)
        self._tokenizer: ClipTokenizer | None = None

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        clip_weights: str | Path | None = None,
        device: str = "auto",
        precision: str = "auto",
        components: frozenset[str] = COMPONENTS,
    ) -> Segmenter:
        """Load weights (hub id, folder, or original decoder file) onto a device.

        ``components`` limits what is loaded (see :data:`clipseg_cli.weights.COMPONENTS`): e.g.
        ``{"text"}`` to embed prompts only, ``{"vision", "decoder"}`` to segment only.

        Raises:
            WeightsError: the weights cannot be found or are not a valid checkpoint.
            ValueError: the device or precision is not available.
        """
        torch_device = resolve_device(device)
        dtype = resolve_precision(precision, torch_device)
        built, info = load_weights(
            model, clip_weights=clip_weights, dtype=dtype, components=frozenset(components)
        )
        return cls(built, info, torch_device)

    @classmethod
    def load_for(cls, options: ModelOptions, components: frozenset[str] = COMPONENTS) -> Segmenter:
        """:meth:`load` with a run's model options (``--model``, ``--clip-weights``,
        ``--device``, ``--precision``)."""
        return cls.load(
            options.model,
            clip_weights=options.clip_weights,
            device=options.device,
            precision=options.precision,
            components=components,
        )

    # -- conditionals ---------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[K, context_length]`` with CLIP's tokenizer."""
        if self._tokenizer is None:
            self._tokenizer = ClipTokenizer(self.model.arch.text.context_length)
        return self._tokenizer(prompts)

    @torch.inference_mode()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text conditionals, float32 ``[K, D]`` on the device."""
        tokens = self.tokenize(prompts).to(self.device)
        return self.model.encode_text(tokens).float()

    @torch.inference_mode()
    def embed_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Image conditionals, float32 ``[K, D]``: each uint8 ``[H, W, 3]`` support image is
        encoded as it is (resized to the model size), by the full CLIP image tower."""
        resized = [resize_rgb(image, self.input_size) for image in images]
        pixels = self.model.normalize(torch.from_numpy(np.stack(resized)).to(self.device))
        return self.model.encode_image(pixels).float()

    def release_prompt_encoders(self) -> None:
        """Free the text tower and the vision blocks only image prompts use (saves ~40%)."""
        self.model.backbone.release_text_tower()
        if self.model.backbone.clip.visual is not None:
            self.model.backbone.release_image_head()

    # -- prediction -----------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, conditionals: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, h, w, 3]`` images at the model size, ``[K, D]`` -> ``[B, K, h, w]`` logits
        (float32, on the device). The vision pass runs once per image for all K prompts."""
        pixels = self.model.normalize(batch.to(self.device, non_blocking=True))
        return self.model(pixels, conditionals.to(self.device)).float()

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray], conditionals: torch.Tensor) -> list[np.ndarray]:
        """Probability maps at each image's own size.

        Args:
            images: uint8 ``[H_i, W_i, 3]`` RGB arrays, any sizes.
            conditionals: ``[K, D]`` from :meth:`embed_texts` / :meth:`embed_images`.

        Returns:
            One float32 ``[K, H_i, W_i]`` array in [0, 1] per image.
        """
        if not images:
            return []
        batch = np.stack([resize_rgb(image, self.input_size) for image in images])
        logits = self.logits(torch.from_numpy(batch), conditionals).cpu().numpy()
        return [probabilities_at_size(logits[i], image.shape[:2]) for i, image in enumerate(images)]
