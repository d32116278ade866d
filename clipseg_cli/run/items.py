"""Engine-independent item functions: decode one input, predict a batch, write one input's
outputs. The local pipeline and the Ray engine both schedule exactly these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from clipseg_cli.errors import FATAL_WRITE_ERRNOS, DiskFullError
from clipseg_cli.io import sources, writers
from clipseg_cli.ops.transforms import probabilities_at_size, resize_rgb, stack_uint8
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.logrows import failure_row
from clipseg_cli.segmenter import Segmenter
from clipseg_cli.version import __version__


@dataclass(frozen=True)
class Conditional:
    """One prompt: its label (text, or ``ref:<path>``) and its file-name slug."""

    label: str
    slug: str


@dataclass
class Prepared:
    """A decoded input, ready for the model."""

    item: sources.InputItem
    out_key: PurePosixPath
    image: sources.DecodedImage
    model_input: np.ndarray  # uint8 [h, w, 3] at the model size
    decode_seconds: float


@dataclass
class Failed:
    """An input that could not be decoded."""

    item: sources.InputItem
    error: str


@dataclass
class Prediction:
    """One image's model output, kept at the model's resolution until it is written.

    Full-size probabilities are made one prompt at a time by :meth:`probabilities`: holding
    all K of them (K x H x W float32, 16 MB for 5 prompts on a 1024x768 photo) for every
    image in flight would make memory grow with the prompt count.

    Attributes:
        low_res_logits: float32 ``[K + N, h, w]``: the K positive prompts, then N negatives.
        positives: K.
        size: ``(H, W)``, the image's size.
    """

    low_res_logits: np.ndarray
    positives: int
    size: tuple[int, int]
    # The negatives' full-size probabilities, made once when the first prompt needs them.
    _negative_probs: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def logits(self) -> np.ndarray:
        """float32 ``[K, h, w]``: the positive prompts' raw logits."""
        return self.low_res_logits[: self.positives]

    def probabilities(self, k: int) -> np.ndarray:
        """float32 ``[H, W]``: prompt ``k``'s probability at the image's size (sigmoid, then
        bilinear upsampling, as a transformers user writes it), negatives applied:
        ``p * (1 - max_n p_negative_n)``."""
        from clipseg_cli.ops.prompts import apply_negatives

        logits = torch.from_numpy(self.low_res_logits[k : k + 1])
        prob = probabilities_at_size(logits, self.size)
        if self.low_res_logits.shape[0] > self.positives:
            if self._negative_probs is None:
                negatives = torch.from_numpy(self.low_res_logits[self.positives :])
                self._negative_probs = probabilities_at_size(negatives, self.size)
            prob = apply_negatives(prob, self._negative_probs)
        return prob[0].numpy()


# -- item functions (shared by every engine) ------------------------------------------------------


def prepare_item(
    item: sources.InputItem, out_key: PurePosixPath, config: SegmentConfig, size: tuple[int, int]
) -> Prepared | Failed:
    """Decode one input and resize it for the model; a decode problem becomes :class:`Failed`."""
    start = time.perf_counter()
    try:
        image = sources.decode_image(
            item.path, max_pixels=config.max_pixels, allow_truncated=config.allow_truncated
        )
    except sources.ImageDecodeError as error:
        return Failed(item, str(error))
    model_input = resize_rgb(image.rgb, size)
    return Prepared(item, out_key, image, model_input, time.perf_counter() - start)


def predict_batch(
    segmenter: Segmenter,
    batch: list[Prepared],
    prompts: PromptSet,
    pad_to: int | None = None,
) -> list[Prediction]:
    """One :class:`Prediction` per image of ``batch`` (logits at the model's resolution).

    Results come back from the device with one synchronisation per batch rather than per image.

    ``pad_to``: run a short batch padded with blank images to this size. The model's kernels
    round differently for different batch sizes (last-bit differences), but not for different
    companions in a batch of the same size: padding makes each image's numbers independent of
    how inputs happened to be grouped (the last batch, a resumed run, another engine).
    """
    inputs = [prepared.model_input for prepared in batch]
    if pad_to is not None and len(inputs) < pad_to:
        inputs += [np.zeros_like(inputs[0])] * (pad_to - len(inputs))
    pixels = stack_uint8(inputs)
    if segmenter.device.type == "cuda":
        pixels = pixels.pin_memory()
    logits = segmenter.logits(pixels, prompts.vectors)
    host = logits[: len(batch)].float().to("cpu", non_blocking=True)
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize(segmenter.device)
    return [
        Prediction(host[i].numpy(), prompts.count, prepared.image.rgb.shape[:2])
        for i, prepared in enumerate(batch)
    ]


def _prompt_stats(prob: np.ndarray, mask: np.ndarray, conditional: Conditional) -> dict:
    return {
        "prompt": conditional.label,
        "max": round(float(prob.max()), 6),
        "mean": round(float(prob.mean()), 6),
        "coverage": round(float(mask.mean()), 6),
        "empty": not mask.any(),
    }


class LabelMap:
    """The ``labels`` output, built one prompt at a time: 1 + the index of the most probable
    prompt where its probability passes the threshold, else 0 (background). Ties go to the
    earlier prompt."""

    def __init__(self, size: tuple[int, int]) -> None:
        self._best = np.full(size, -np.inf, np.float32)
        self._label = np.zeros(size, np.uint8)

    def add(self, k: int, prob: np.ndarray) -> None:
        """Take prompt ``k``'s probabilities, float ``[H, W]``, into account."""
        better = prob > self._best
        self._best[better] = prob[better]
        self._label[better] = k + 1

    def labels(self, threshold: float) -> np.ndarray:
        """uint8 ``[H, W]``."""
        return np.where(self._best > threshold, self._label, np.uint8(0))


def composite_background(rgb: np.ndarray, background: str) -> np.ndarray:
    """uint8 ``[H, W, 3]`` background for ``composite``: ``blur`` (the image itself, heavily
    blurred), a colour (``white``, ``#00ff00``, ``0,255,0``), or an image file (resized to
    cover)."""
    height, width = rgb.shape[:2]
    if background == "blur":
        import cv2

        sigma = max(height, width) / 40
        return cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma)
    colour = parse_colour(background)
    if colour is not None:
        return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3))
    image = sources.decode_image(Path(background)).rgb
    scale = max(height / image.shape[0], width / image.shape[1])
    size = (max(height, round(image.shape[0] * scale)), max(width, round(image.shape[1] * scale)))
    resized = resize_rgb(image, size)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return resized[top : top + height, left : left + width]


def parse_colour(text: str) -> tuple[int, int, int] | None:
    """``white``/``black``/``green``..., ``#rrggbb`` or ``r,g,b`` -> RGB; None if not a colour."""
    from PIL import ImageColor

    if "," in text:
        parts = text.split(",")
        if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= 255 for p in parts):
            return tuple(int(p) for p in parts)  # type: ignore[return-value]
        return None
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        return None


def write_item(
    prepared: Prepared,
    prediction: Prediction,
    config: SegmentConfig,
    conditionals: list[Conditional],
) -> dict:
    """Write every requested output of one image; returns its log row."""
    from clipseg_cli.ops.matting import refine_matte

    start = time.perf_counter()
    out_dir, key, rgb = config.out_dir, prepared.out_key, prepared.image.rgb
    outputs = []

    def target(kind: str, ext: str, conditional: Conditional | None) -> Path:
        path = writers.output_path(
            out_dir, key, kind, ext, conditional.slug if conditional else None
        )
        outputs.append(
            {
                "prompt": conditional.label if conditional else None,
                "kind": kind,
                "path": sources.display_path(path),
            }
        )
        return path

    matting = config.command == "matte"
    background = None
    stats = []
    labels = LabelMap(rgb.shape[:2]) if "labels" in config.save else None
    for k, conditional in enumerate(conditionals):
        prob = prediction.probabilities(k)
        mask = prob > config.threshold
        stats.append(_prompt_stats(prob, mask, conditional))
        if labels is not None:
            labels.add(k, prob)
        matte = None
        if matting:
            matte = refine_matte(rgb, prob, method=config.refine, threshold=config.threshold)
        for kind in config.save:
            if kind == "mask":
                writers.write_mask(target("mask", "png", conditional), mask)
            elif kind == "soft":
                writers.write_soft(target("soft", "png", conditional), prob, config.soft_bits)
            elif kind == "overlay":
                writers.write_overlay(target("overlay", "png", conditional), rgb, mask)
            elif kind == "cutout":
                alpha = matte if matting else prob if config.cutout_alpha == "soft" else mask
                writers.write_cutout(target("cutout", "png", conditional), rgb, alpha)
            elif kind == "logits":
                writers.write_logits(target("logits", "npy", conditional), prediction.logits[k])
            elif kind == "matte":
                writers.write_soft(target("matte", "png", conditional), matte, config.soft_bits)
            elif kind == "composite":
                if background is None:
                    background = composite_background(rgb, config.background)
                blend = matte[..., None]
                composed = rgb * blend + background * (1.0 - blend)
                image = np.clip(np.rint(composed), 0, 255).astype(np.uint8)
                writers.write_rgb(target("composite", "png", conditional), image)
    if labels is not None:
        palette = writers.label_palette(len(conditionals))
        path = target("labels", "png", None)
        writers.write_labels(path, labels.labels(config.threshold), palette)
    height, width = rgb.shape[:2]
    return {
        "input": sources.display_path(prepared.item.path),
        "key": sources.display_path(prepared.item.key),
        "status": "ok",
        "error": None,
        "width": width,
        "height": height,
        "mode": prepared.image.mode,
        "prompts": stats,
        "outputs": outputs,
        "timings": {
            "decode_s": round(prepared.decode_seconds, 4),
            "write_s": round(time.perf_counter() - start, 4),
        },
    }


def failure_for(failed: Failed) -> dict:
    return failure_row(
        sources.display_path(failed.item.path), sources.display_path(failed.item.key), failed.error
    )


def write_or_fail(
    prepared: Prepared,
    prediction: Prediction,
    config: SegmentConfig,
    labels: list[Conditional],
) -> dict:
    """Write outputs; a disk problem for one image becomes its failed row."""
    try:
        return write_item(prepared, prediction, config, labels)
    except OSError as error:
        if error.errno in FATAL_WRITE_ERRNOS:
            raise DiskFullError(
                error.errno, f"cannot write {error.filename}: {error.strerror}"
            ) from None
        reason = f"cannot write outputs: {error.strerror or error}"
        return failure_row(
            sources.display_path(prepared.item.path),
            sources.display_path(prepared.item.key),
            reason,
        )


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's float32 bytes (records which conditionals a run used)."""
    import hashlib

    data = tensor.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass
class PromptSet:
    """Every conditional of a run, embedded once.

    ``vectors`` is ``[K + N, D]``: K positive prompts (each gets outputs) followed by N negative
    prompts (never written; they suppress: ``p_k * (1 - max_n p_neg_n)``).
    """

    vectors: torch.Tensor
    positives: list[Conditional]
    negatives: list[str]

    @property
    def count(self) -> int:
        return len(self.positives)


def _reference_image(ref: Path, mask_path: Path | None, config: SegmentConfig) -> np.ndarray:
    """The support image CLIP encodes: engineered around its object when a mask is known
    (``--ref-mask`` or the reference's own alpha), raw otherwise (or with ``--ref-mode raw``)."""
    from clipseg_cli.ops.prompts import engineer_reference, reference_mask_from_alpha

    def decode(path: Path, what: str) -> sources.DecodedImage:
        try:
            return sources.decode_image(path, max_pixels=config.max_pixels)
        except sources.ImageDecodeError as error:
            raise ValueError(f"{what} {path}: {error}") from None

    image = decode(ref, "--ref")
    mask = None
    if mask_path is not None:
        mask = decode(mask_path, "--ref-mask").rgb.max(axis=2) > 127
        if mask.shape != image.rgb.shape[:2]:
            raise ValueError(f"--ref-mask {mask_path}: its size differs from --ref {ref}")
    elif image.alpha is not None:
        mask = reference_mask_from_alpha(image.alpha)
    mode = config.ref_mode or ("engineered" if mask is not None else "raw")
    if mode == "raw":
        return image.rgb
    if mask is None:
        raise ValueError(f"--ref-mode engineered needs an object mask for {ref}: give --ref-mask")
    try:
        return engineer_reference(image.rgb, mask, size=None)
    except ValueError as error:
        raise ValueError(f"--ref {ref}: {error}") from None


def _load_prompt_set(segmenter: Segmenter, path: Path) -> PromptSet:
    from clipseg_cli.ops.prompts import load_conditionals

    vectors, labels, metadata = load_conditionals(path)
    made_with = metadata.get("weights_sha256")
    if made_with is not None and made_with != segmenter.info.sha256:
        raise ValueError(
            f"--prompt-embedding {path} was made with other weights (sha256 {made_with[:12]}, "
            f"this model {segmenter.info.sha256[:12]}); embeddings only fit the model that "
            "made them: re-create it with --save-prompt"
        )
    if vectors.shape[1] != segmenter.model.arch.embed_dim:
        raise ValueError(
            f"--prompt-embedding {path}: vectors of size {vectors.shape[1]}, the model needs "
            f"{segmenter.model.arch.embed_dim}"
        )
    negatives = int(metadata.get("negatives", 0))
    positives = labels[: len(labels) - negatives]
    slugs = writers.prompt_slugs(positives)
    conditionals = [Conditional(label, slug) for label, slug in zip(positives, slugs, strict=True)]
    return PromptSet(vectors, conditionals, labels[len(positives) :])


def build_prompt_set(segmenter: Segmenter, config: SegmentConfig) -> PromptSet:
    """Embed the run's prompts once (or read them from ``--prompt-embedding``).

    Several ``--ref`` images describe one object: their embeddings are averaged into one
    conditional. With ``--mix W`` each text prompt becomes ``W * text + (1 - W) * image``.
    """
    from clipseg_cli.ops.prompts import average_conditionals, mix_conditionals

    if config.prompt_embedding is not None:
        return _load_prompt_set(segmenter, config.prompt_embedding)
    labels: list[str] = []
    slug_sources: list[str] = []
    parts = []
    text = segmenter.embed_texts(config.prompts) if config.prompts else None
    image = image_label = None
    if config.refs:
        masks = list(config.ref_masks) + [None] * (len(config.refs) - len(config.ref_masks))
        pairs = zip(config.refs, masks, strict=True)
        references = [_reference_image(ref, mask, config) for ref, mask in pairs]
        image = average_conditionals(segmenter.embed_images(references))[None]
        image_label = "ref:" + ",".join(str(ref) for ref in config.refs)
    if text is not None and image is not None and config.mix is not None:
        parts.append(mix_conditionals(text, image, config.mix))
        labels += [f"{prompt} (mix {config.mix:g} with {image_label})" for prompt in config.prompts]
        slug_sources += [f"{prompt} mix ref" for prompt in config.prompts]
    else:
        if text is not None:
            parts.append(text)
            labels += list(config.prompts)
            slug_sources += list(config.prompts)
        if image is not None:
            parts.append(image)
            labels.append(image_label)
            slug_sources.append(f"ref-{Path(config.refs[0]).stem}")
    if config.negatives:
        parts.append(segmenter.embed_texts(config.negatives))
    slugs = writers.prompt_slugs(slug_sources)
    positives = [Conditional(label, slug) for label, slug in zip(labels, slugs, strict=True)]
    return PromptSet(torch.cat(parts), positives, list(config.negatives))


def save_prompt_set(path: Path, prompts: PromptSet, info) -> None:
    """Write the run's conditionals for reuse with ``--prompt-embedding`` (then neither the
    text tower nor the reference images are needed)."""
    from clipseg_cli.ops.prompts import save_conditionals

    labels = [c.label for c in prompts.positives] + prompts.negatives
    metadata = {
        "model": info.model_id,
        "weights_sha256": info.sha256,
        "negatives": len(prompts.negatives),
    }
    save_conditionals(path, prompts.vectors.detach().float().cpu(), labels, metadata)


def versions() -> dict:
    import open_clip
    import PIL

    return {
        "clipseg_cli": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }
