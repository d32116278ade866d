"""A run's prompts, embedded once: text prompts, image prompts (``--ref``), their mix, the
negatives, or a prompt file saved by an earlier run.

The prompt phase loads only what the prompts need (the text tower, or the whole image tower
for ``--ref``), and only when something must be computed: text prompts embedded on the CPU in
full precision are cached (:mod:`clipseg_cli.backends.cache`, keyed by the weights' sha256 and
the prompt's text), so a warm run with known weights and prompts loads no tower and imports no
torch. When the image side runs on a CPU runtime (ONNX Runtime, OpenVINO), prompts not cached
yet are embedded by the text tower's ONNX graph (:mod:`clipseg_cli.backends.text`, exported
once), so a warm run with new prompts imports no torch either. The segmentation phase loads
vision blocks 0-9 and the decoder (:mod:`.backend`): the whole model is never resident at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipseg_cli.backends.cache import load_text_embeddings, store_text_embeddings
from clipseg_cli.io import sources
from clipseg_cli.io.conditionals import load_conditionals, save_conditionals
from clipseg_cli.io.masks import MaskError, read_mask
from clipseg_cli.io.naming import prompt_slugs
from clipseg_cli.ops.prompts import (
    average_conditionals,
    engineer_reference,
    mix_conditionals,
    reference_mask_from_alpha,
)
from clipseg_cli.run.backend import SEGMENTATION_PARTS, BackendChoice
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.specs import ArchitectureSpec
from clipseg_cli.weights import WeightsInfo, identify

if TYPE_CHECKING:
    from clipseg_cli.segmenter import Segmenter


def prompt_parts(config: SegmentConfig) -> frozenset[str]:
    """The parts of the model the prompt phase loads (see the module docstring)."""
    if config.prompt_embedding is not None:
        return SEGMENTATION_PARTS  # the file is checked against these weights, then segments
    parts = {"text"} if config.prompts or config.negatives else set()
    if config.refs:
        parts |= {"vision", "image_head"}
    return frozenset(parts)


@dataclass(frozen=True)
class Conditional:
    """One prompt: its label (text, or ``ref:<path>``) and its file-name slug."""

    label: str
    slug: str


def vectors_sha256(vectors: np.ndarray) -> str:
    """sha256 of conditionals' float32 bytes (records which conditionals a run used)."""
    return hashlib.sha256(np.ascontiguousarray(vectors, np.float32).tobytes()).hexdigest()


@dataclass
class PromptSet:
    """Every conditional of a run, embedded once.

    ``vectors`` is float32 ``[K + N, D]``: K positive prompts (each gets outputs) followed by N
    negative prompts (never written; they suppress: ``p_k * (1 - max_n p_neg_n)``).
    """

    vectors: np.ndarray
    positives: list[Conditional]
    negatives: list[str]

    @property
    def count(self) -> int:
        return len(self.positives)


def _to_array(vectors) -> np.ndarray:
    """A Segmenter's conditionals (a tensor on its device) as float32 numpy ``[K, D]``."""
    return vectors.detach().float().cpu().numpy()


@dataclass
class PromptModel:
    """The model as the prompt phase needs it: which weights (their record and architecture),
    and the prompt towers, loaded on first use.

    Args:
        config: the run's options.
        choice: the run's backend choice; text prompts are cached when the towers run on the
            CPU in fp32 (what the CPU runtimes always use for them), and embedded through the
            text graph when the image side runs on a CPU runtime.
        segmenter: a loaded model to use instead (the Python API's ``run_segment``).
    """

    config: SegmentConfig
    choice: BackendChoice
    segmenter: Segmenter | None = None
    #: The towers to load (default: what ``config``'s prompts need, :func:`prompt_parts`); a
    #: server names every tower its requests may need.
    parts: frozenset[str] | None = None
    #: One-line messages for the user (a text cache that could not be written).
    notes: list[str] = field(default_factory=list)
    #: Receives progress messages while the text graph is exported (default: :attr:`notes`).
    on_progress: Callable[[str], None] | None = field(default=None, compare=False)
    #: Keep the text graph's session between calls (a server); a run frees it after each.
    resident: bool = False
    _text_encoder: object | None = field(default=None, repr=False)
    _identity: tuple[WeightsInfo, ArchitectureSpec] | None = field(default=None, repr=False)
    _given: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self._given = self.segmenter is not None
        if self._given:
            self._identity = (self.segmenter.info, self.segmenter.model.arch)
        else:
            self._identity = identify(self.config.model, self.config.clip_weights)

    @property
    def on_cpu_fp32(self) -> bool:
        """Whether the towers run on the CPU in fp32 (then text embeddings are cached)."""
        if self._given:
            return False  # the caller's model: its device and dtype are its own
        return self.choice.cpu_runtime or (
            self.choice.device == "cpu" and self.choice.precision == "fp32"
        )

    def towers(self) -> Segmenter:
        """The prompt towers (loaded once, on first use)."""
        if self.segmenter is None:
            from clipseg_cli.segmenter import Segmenter

            torch_backend = self.choice.name == "torch"
            self.segmenter = Segmenter.load(
                self.config.model,
                clip_weights=self.config.clip_weights,
                device=self.choice.device if torch_backend else "cpu",
                precision=self.choice.precision if torch_backend else "fp32",
                components=self.parts or prompt_parts(self.config),
            )
            self._identity = (self.segmenter.info, self.segmenter.model.arch)
        return self.segmenter

    @property
    def identity(self) -> tuple[WeightsInfo, ArchitectureSpec]:
        """(the weights' record, the architecture), loading the towers if no earlier run
        remembered them."""
        if self._identity is None:
            self.towers()
        return self._identity

    @property
    def text_graph(self) -> bool:
        """Whether new text prompts go through the text tower's ONNX graph (no torch): when
        the image side runs on a CPU runtime."""
        return not self._given and self.choice.cpu_runtime

    def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
        """float32 ``[K, D]`` text conditionals: each from the cache when it is there, the
        others computed (in one call) and cached."""
        prompts = list(prompts)
        if not self.on_cpu_fp32:
            return _to_array(self.towers().embed_texts(prompts))
        sha256 = self.identity[0].sha256
        rows: dict[str, np.ndarray] = {}
        for prompt in dict.fromkeys(prompts):
            cached = load_text_embeddings(sha256, [prompt])
            if cached is not None:
                rows[prompt] = cached[0]
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in rows]
        if missing:
            vectors = self._embed_new(missing)
            problem = store_text_embeddings(sha256, missing, vectors)
            if problem is not None:
                self.notes.append(problem)
            rows.update(zip(missing, vectors, strict=True))
        if not prompts:
            return np.zeros((0, self.identity[1].embed_dim), np.float32)
        return np.stack([rows[prompt] for prompt in prompts]).astype(np.float32, copy=False)

    def _embed_new(self, prompts: list[str]) -> np.ndarray:
        """Texts the cache does not hold: through the text graph on a CPU runtime's run, else
        the torch tower."""
        if self.text_graph:
            from clipseg_cli.backends.base import BackendError

            try:
                encoder = self._text_encoder or self._open_text_encoder()
            except BackendError as error:  # e.g. an exporter that fails on this install
                self.notes.append(f"{error}: text prompts are embedded with torch instead")
            else:
                self._text_encoder = encoder if self.resident else None
                return encoder.embed_texts(prompts)
        return _to_array(self.towers().embed_texts(prompts))

    def _open_text_encoder(self):
        from clipseg_cli.backends.text import open_text_encoder

        info, arch = self.identity
        say = self.on_progress or self.notes.append
        loaded = open_text_encoder(
            info.sha256, arch, self._text_model, label=info.model_id, on_progress=say
        )
        for warning in loaded.warnings:
            self.notes.append(warning)
        return loaded.encoder

    def _text_model(self):
        """The float32 text tower to export: the loaded towers' when they hold it (a first run
        loads them to learn the weights' identity), else only the text tower."""
        if (
            self.segmenter is not None
            and self.segmenter.model.backbone.clip.transformer is not None
        ):
            return self.segmenter.model
        from clipseg_cli.weights import load_weights

        model, _info = load_weights(
            self.config.model, clip_weights=self.config.clip_weights, components=frozenset({"text"})
        )
        return model

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 ``[K, D]`` image conditionals of support images."""
        return _to_array(self.towers().embed_images(images))


@dataclass(frozen=True)
class Reference:
    """An image prompt: a support image and, optionally, its object mask. Files (``--ref``,
    ``--ref-mask``) or the bytes of a server request's uploads; ``name`` is what the prompt's
    label shows (``ref:NAME``), never opened."""

    name: str
    image: Path | bytes
    mask: Path | bytes | None = None

    @classmethod
    def from_config(cls, config: SegmentConfig) -> list[Reference]:
        """``--ref`` files paired in order with ``--ref-mask`` files."""
        masks = list(config.ref_masks) + [None] * (len(config.refs) - len(config.ref_masks))
        return [cls(str(ref), ref, mask) for ref, mask in zip(config.refs, masks, strict=True)]


def _reference_image(reference: Reference, config: SegmentConfig) -> np.ndarray:
    """The support image CLIP encodes: engineered around its object when a mask is known
    (``--ref-mask`` or the reference's own alpha), raw otherwise (or with ``--ref-mode raw``).

    A ``--ref-mask`` file means what every mask file means (:func:`clipseg_cli.io.masks.read_mask`).
    """
    ref = reference.name
    try:
        image = sources.decode_image(reference.image, max_pixels=config.max_pixels)
    except sources.ImageDecodeError as error:
        raise ValueError(f"--ref {ref}: {error}") from None
    mask = None
    if reference.mask is not None:
        shown = reference.mask if isinstance(reference.mask, Path) else f"of {ref}"
        try:
            mask = read_mask(reference.mask, max_pixels=config.max_pixels).foreground()
        except MaskError as error:
            raise ValueError(f"--ref-mask {shown}: {error}") from None
        if mask.shape != image.rgb.shape[:2]:
            raise ValueError(f"--ref-mask {shown}: its size differs from --ref {ref}")
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


def _load_prompt_set(model: PromptModel, path: Path) -> PromptSet:
    vectors, labels, metadata = load_conditionals(path)
    info, arch = model.identity
    made_with = metadata.get("weights_sha256")
    if made_with is not None and made_with != info.sha256:
        raise ValueError(
            f"--prompt-embedding {path} was made with other weights (sha256 {made_with[:12]}, "
            f"this model {info.sha256[:12]}); embeddings only fit the model that made them: "
            "re-create it with --save-prompt"
        )
    if vectors.shape[1] != arch.embed_dim:
        raise ValueError(
            f"--prompt-embedding {path}: vectors of size {vectors.shape[1]}, the model needs "
            f"{arch.embed_dim}"
        )
    negatives = int(metadata.get("negatives", 0))
    positives = labels[: len(labels) - negatives]
    slugs = prompt_slugs(positives)
    conditionals = [Conditional(label, slug) for label, slug in zip(positives, slugs, strict=True)]
    return PromptSet(vectors, conditionals, labels[len(positives) :])


def build_prompt_set(
    model: PromptModel, config: SegmentConfig, references: Sequence[Reference] | None = None
) -> PromptSet:
    """Embed the run's prompts once (or read them from ``--prompt-embedding``).

    Several ``--ref`` images describe one object: their embeddings are averaged into one
    conditional. With ``--mix W`` each text prompt becomes ``W * text + (1 - W) * image``.
    ``references``: the image prompts (default: ``config``'s ``--ref`` files).
    """
    if config.prompt_embedding is not None:
        return _load_prompt_set(model, config.prompt_embedding)
    if references is None:
        references = Reference.from_config(config)
    labels: list[str] = []
    slug_sources: list[str] = []
    parts = []
    text = model.embed_texts(config.prompts) if config.prompts else None
    image = image_label = None
    if references:
        supports = [_reference_image(reference, config) for reference in references]
        image = average_conditionals(model.embed_images(supports))[None]
        image_label = "ref:" + ",".join(reference.name for reference in references)
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
            slug_sources.append(f"ref-{Path(references[0].name).stem}")
    if config.negatives:
        parts.append(model.embed_texts(config.negatives))
    slugs = prompt_slugs(slug_sources)
    positives = [Conditional(label, slug) for label, slug in zip(labels, slugs, strict=True)]
    return PromptSet(np.concatenate(parts), positives, list(config.negatives))


def save_prompt_set(path: Path, prompts: PromptSet, info: WeightsInfo) -> None:
    """Write the run's conditionals for reuse with ``--prompt-embedding`` (then neither the
    text tower nor the reference images are needed)."""
    labels = [c.label for c in prompts.positives] + prompts.negatives
    metadata = {
        "model": info.model_id,
        "weights_sha256": info.sha256,
        "negatives": len(prompts.negatives),
    }
    save_conditionals(path, prompts.vectors, labels, metadata)
