"""Strict conversion of every public CLIPSeg layout into our model, and back to transformers'.

Conversion is strict in the nanoGPT manner: every key of the source must be used or be on a short
list of known-derived buffers, every key of our model must be filled, every shape must match;
anything else is a :class:`WeightsError` naming the keys. Architectures are read from configs
(transformers) or from tensor shapes (original files, OpenAI CLIP), never assumed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from clipseg_cli.errors import WeightsError, first_line
from clipseg_cli.model.backbone import causal_mask
from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.specs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArchitectureSpec,
    DecoderSpec,
    TextSpec,
    VisionSpec,
)
from clipseg_cli.weights.files import (
    OPENAI_METADATA_KEYS,
    StateDict,
    name_some,
    read_state_dict,
)
from clipseg_cli.weights.locate import transformers_files

# Keys that old transformers checkpoints persisted although they are derived (position ids).
_HF_DERIVED_KEYS = frozenset(
    {"clip.text_model.embeddings.position_ids", "clip.vision_model.embeddings.position_ids"}
)
# The original decoder has an unused ``reduce`` layer; the released files carry it.
_ORIGINAL_UNUSED_KEYS = frozenset({"reduce.weight", "reduce.bias"})

# Parts of the model that can be loaded separately: prompts need "text" (and, for image prompts,
# "vision" + "image_head"); segmentation needs "vision" + "decoder". Loading only what a phase
# needs keeps peak memory at the larger part rather than the whole model.
COMPONENTS = frozenset({"text", "vision", "image_head", "decoder"})
_RESBLOCK = re.compile(r"^backbone\.clip\.visual\.transformer\.resblocks\.(\d+)\.")


def component_of(key: str, arch: ArchitectureSpec) -> str:
    """Which of :data:`COMPONENTS` our parameter ``key`` belongs to."""
    if key.startswith("decoder."):
        return "decoder"
    if key.startswith("backbone.clip.visual."):
        block = _RESBLOCK.match(key)
        if block is not None:
            return "vision" if int(block.group(1)) <= arch.last_needed_layer else "image_head"
        if key.startswith(("backbone.clip.visual.ln_post.", "backbone.clip.visual.proj")):
            return "image_head"
        return "vision"
    return "text"


# -- strict conversion ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """Our key <- ``combine(*source keys)``."""

    ours: str
    sources: tuple[str, ...]
    combine: Callable[..., torch.Tensor] = lambda tensor: tensor


def _concat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def _transpose(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t().contiguous()


def _apply_rules(
    source: StateDict,
    rules: list[_Rule],
    expected: Mapping[str, torch.Size],
    *,
    ignorable: frozenset[str],
    what: str,
    dtype: torch.dtype = torch.float32,
    skip: Callable[[str], bool] = lambda _key: False,
) -> dict[str, torch.Tensor]:
    """Build our state dict from ``source``; every key and shape accounted for, or an error.

    Keys for which ``skip(our_key)`` is true are checked for presence but never read.
    """
    missing = sorted({key for rule in rules for key in rule.sources if key not in source})
    used = {key for rule in rules for key in rule.sources}
    unexpected = sorted(set(source) - used - ignorable)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {name_some(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {name_some(unexpected)}")
        raise WeightsError(f"{what}: {'; '.join(parts)}")
    unfilled = sorted(set(expected) - {rule.ours for rule in rules})
    if unfilled:  # a bug in our rules, not in the user's file
        raise RuntimeError(f"conversion rules leave {name_some(unfilled)} unfilled")
    converted: dict[str, torch.Tensor] = {}
    wrong_shapes = []
    for rule in rules:
        if skip(rule.ours):
            continue
        tensor = rule.combine(*(source[key] for key in rule.sources))
        if tensor.shape != expected[rule.ours]:
            wrong_shapes.append(
                f"{'+'.join(rule.sources)} {tuple(tensor.shape)} (expected "
                f"{tuple(expected[rule.ours])})"
            )
        converted[rule.ours] = tensor.to(dtype)
    if wrong_shapes:
        raise WeightsError(f"{what}: wrong shapes: {name_some(wrong_shapes, 3)}")
    return converted


def _linear(rules: list[_Rule], ours: str, theirs: str) -> None:
    for param in ("weight", "bias"):
        rules.append(_Rule(f"{ours}.{param}", (f"{theirs}.{param}",)))


def _attention(rules: list[_Rule], ours: str, theirs: str) -> None:
    """transformers' separate q/k/v projections -> torch's packed ``in_proj``."""
    for param in ("weight", "bias"):
        sources = tuple(f"{theirs}.{p}_proj.{param}" for p in "qkv")
        rules.append(_Rule(f"{ours}.in_proj_{param}", sources, _concat))
    _linear(rules, f"{ours}.out_proj", f"{theirs}.out_proj")


def _hf_tower_blocks(rules: list[_Rule], ours: str, theirs: str, layers: int) -> None:
    for i in range(layers):
        block, layer = f"{ours}.resblocks.{i}", f"{theirs}.layers.{i}"
        _attention(rules, f"{block}.attn", f"{layer}.self_attn")
        _linear(rules, f"{block}.ln_1", f"{layer}.layer_norm1")
        _linear(rules, f"{block}.mlp.c_fc", f"{layer}.mlp.fc1")
        _linear(rules, f"{block}.mlp.c_proj", f"{layer}.mlp.fc2")
        _linear(rules, f"{block}.ln_2", f"{layer}.layer_norm2")


def transformers_rules(arch: ArchitectureSpec) -> list[_Rule]:
    """Mapping from transformers' ``CLIPSegForImageSegmentation`` keys to ours."""
    rules: list[_Rule] = []
    vis, hv = "backbone.clip.visual", "clip.vision_model"
    rules += [
        _Rule(f"{vis}.conv1.weight", (f"{hv}.embeddings.patch_embedding.weight",)),
        _Rule(f"{vis}.class_embedding", (f"{hv}.embeddings.class_embedding",)),
        _Rule(f"{vis}.positional_embedding", (f"{hv}.embeddings.position_embedding.weight",)),
        _Rule(f"{vis}.proj", ("clip.visual_projection.weight",), _transpose),
    ]
    _linear(rules, f"{vis}.ln_pre", f"{hv}.pre_layrnorm")
    _linear(rules, f"{vis}.ln_post", f"{hv}.post_layernorm")
    _hf_tower_blocks(rules, f"{vis}.transformer", f"{hv}.encoder", arch.vision.layers)

    txt, ht = "backbone.clip", "clip.text_model"
    rules += [
        _Rule(f"{txt}.token_embedding.weight", (f"{ht}.embeddings.token_embedding.weight",)),
        _Rule(f"{txt}.positional_embedding", (f"{ht}.embeddings.position_embedding.weight",)),
        _Rule(f"{txt}.text_projection", ("clip.text_projection.weight",), _transpose),
        _Rule(f"{txt}.logit_scale", ("clip.logit_scale",)),
    ]
    _linear(rules, f"{txt}.ln_final", f"{ht}.final_layer_norm")
    _hf_tower_blocks(rules, f"{txt}.transformer", f"{ht}.encoder", arch.text.layers)

    _linear(rules, "decoder.film_mul", "decoder.film_mul")
    _linear(rules, "decoder.film_add", "decoder.film_add")
    for i in range(len(arch.decoder.extract_layers)):
        _linear(rules, f"decoder.reduces.{i}", f"decoder.reduces.{i}")
        block, layer = f"decoder.blocks.{i}", f"decoder.layers.{i}"
        _attention(rules, f"{block}.self_attn", f"{layer}.self_attn")
        _linear(rules, f"{block}.norm1", f"{layer}.layer_norm1")
        _linear(rules, f"{block}.linear1", f"{layer}.mlp.fc1")
        _linear(rules, f"{block}.linear2", f"{layer}.mlp.fc2")
        _linear(rules, f"{block}.norm2", f"{layer}.layer_norm2")
    head_layers = ("0.", "2.", "4.") if arch.decoder.refined_head else ("",)
    for layer in head_layers:
        _linear(
            rules,
            f"decoder.trans_conv.{layer}".rstrip("."),
            f"decoder.transposed_convolution.{layer}".rstrip("."),
        )
    return rules


def _identity_rules(expected: Mapping[str, torch.Size], ours_prefix: str) -> list[_Rule]:
    """Same names, ours prefixed (original decoder files, OpenAI CLIP state dicts)."""
    return [
        _Rule(key, (key[len(ours_prefix) :],)) for key in expected if key.startswith(ours_prefix)
    ]


# -- architectures from configs and shapes ---------------------------------------------------------


def architecture_from_hf_config(config: Mapping) -> ArchitectureSpec:
    """Our architecture from a transformers ``CLIPSegConfig`` dict.

    Keys a config omits take the CLIPSeg ViT-B/16 value (not transformers' generic defaults,
    whose patch size is 32).
    """
    vision_cfg = config.get("vision_config") or {}
    text_cfg = config.get("text_config") or {}
    vd, td, dd = VisionSpec(), TextSpec(), DecoderSpec()
    vision_width = vision_cfg.get("hidden_size", vd.width)
    text_width = text_cfg.get("hidden_size", td.width)
    vision = VisionSpec(
        width=vision_width,
        layers=vision_cfg.get("num_hidden_layers", vd.layers),
        heads=vision_cfg.get("num_attention_heads", vd.heads),
        patch_size=vision_cfg.get("patch_size", vd.patch_size),
        mlp_ratio=vision_cfg.get("intermediate_size", 4 * vision_width) / vision_width,
        pretrain_image_size=vision_cfg.get("image_size", vd.pretrain_image_size),
    )
    text = TextSpec(
        width=text_width,
        layers=text_cfg.get("num_hidden_layers", td.layers),
        heads=text_cfg.get("num_attention_heads", td.heads),
        mlp_ratio=text_cfg.get("intermediate_size", 4 * text_width) / text_width,
        context_length=text_cfg.get("max_position_embeddings", td.context_length),
        vocab_size=text_cfg.get("vocab_size", td.vocab_size),
    )
    decoder = DecoderSpec(
        reduce_dim=config.get("reduce_dim", dd.reduce_dim),
        heads=config.get("decoder_num_attention_heads", dd.heads),
        feedforward_dim=config.get("decoder_intermediate_size", dd.feedforward_dim),
        extract_layers=tuple(config.get("extract_layers", dd.extract_layers)),
        refined_head=bool(config.get("use_complex_transposed_convolution", False)),
    )
    _check_unsupported_hf_options(config, vision_cfg, text_cfg)
    return ArchitectureSpec(
        vision=vision,
        text=text,
        decoder=decoder,
        embed_dim=config.get("projection_dim", 512),
        input_size=config.get("clipseg_input_size", ArchitectureSpec().input_size),
    )


def _check_unsupported_hf_options(config: Mapping, vision_cfg: Mapping, text_cfg: Mapping) -> None:
    if config.get("conditional_layer", 0) != 0:
        raise WeightsError("config.json: conditional_layer != 0 is not supported")
    for name, sub in (("vision_config", vision_cfg), ("text_config", text_cfg)):
        act = sub.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise WeightsError(f"config.json: {name}.hidden_act={act!r} is not supported")


def architecture_from_openai_clip(state: StateDict, decoder: DecoderSpec) -> ArchitectureSpec:
    """Dimensions of an OpenAI-format CLIP ViT from its shapes (as open_clip derives them)."""
    try:
        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        text_width = state["ln_final.weight"].shape[0]
        context, _ = state["positional_embedding"].shape
        vocab = state["token_embedding.weight"].shape[0]
        embed_dim = state["text_projection"].shape[1]
    except KeyError as error:
        raise WeightsError(f"not an OpenAI-format CLIP ViT state dict: no key {error}") from None
    vision_layers = _count_blocks(state, "visual.transformer.resblocks.")
    text_layers = _count_blocks(state, "transformer.resblocks.")
    # OpenAI's ViTs use 64-wide heads; the state dict does not record the head count.
    vision_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    text_mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width
    return ArchitectureSpec(
        vision=VisionSpec(width, vision_layers, width // 64, patch, vision_mlp, grid * patch),
        text=TextSpec(text_width, text_layers, text_width // 64, text_mlp, context, vocab),
        decoder=decoder,
        embed_dim=embed_dim,
    )


def _count_blocks(state: StateDict, prefix: str) -> int:
    indices = {int(key[len(prefix) :].split(".")[0]) for key in state if key.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def decoder_spec_from_original(state: StateDict, what: str) -> DecoderSpec:
    """Variant detection from an original decoder file's shapes."""
    if "film_mul.weight" not in state or "blocks.0.linear1.weight" not in state:
        raise WeightsError(
            f"{what}: not a CLIPSeg decoder (no film_mul / blocks keys; found e.g. "
            f"{name_some(sorted(state), 3)})"
        )
    return DecoderSpec(
        reduce_dim=state["film_mul.weight"].shape[0],
        feedforward_dim=state["blocks.0.linear1.weight"].shape[0],
        extract_layers=tuple(DecoderSpec().extract_layers[: _count_blocks(state, "blocks.")]),
        refined_head="trans_conv.0.weight" in state,
    )


# -- building the model ---------------------------------------------------------------------------


def _expected_shapes(arch: ArchitectureSpec) -> dict[str, torch.Size]:
    with torch.device("meta"):
        skeleton = ClipSegModel(arch)
    return {key: value.shape for key, value in skeleton.state_dict().items()}


def build_model(
    arch: ArchitectureSpec,
    state: StateDict,
    dtype: torch.dtype,
    components: frozenset[str] = COMPONENTS,
) -> ClipSegModel:
    """Instantiate without random init (meta device) and adopt ``state``'s tensors in place.

    Parts not in ``components`` are removed from the model (``state`` need not hold them).
    """
    with torch.device("meta"):
        model = ClipSegModel(arch)
    if "text" not in components:
        model.backbone.release_text_tower()
    if "image_head" not in components:
        model.backbone.release_image_head()
    if "decoder" not in components:
        model.decoder = None
    if "vision" not in components:
        model.backbone.clip.visual = None
    state = {key: tensor.to(dtype) for key, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in checkpoints: make them real.
    model.pixel_mean = torch.tensor(IMAGENET_MEAN)
    model.pixel_std = torch.tensor(IMAGENET_STD)
    model.backbone.clip.attn_mask = causal_mask(arch.text.context_length)
    leftover = [name for name, t in model.named_buffers() if t.is_meta]
    leftover += [name for name, t in model.named_parameters() if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left uninitialised: {name_some(leftover)}")
    return model.eval().requires_grad_(False)


def load_transformers_dir(
    directory: Path,
    dtype: torch.dtype = torch.float32,
    components: frozenset[str] = COMPONENTS,
):
    """A ``save_pretrained`` folder -> (model, layout files, architecture)."""
    config_path, weights_path = transformers_files(directory)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"{config_path}: not valid JSON ({first_line(error)})") from None
    if config.get("model_type", "clipseg") != "clipseg":
        raise WeightsError(
            f"{config_path}: model_type is {config.get('model_type')!r}, not clipseg"
        )
    arch = architecture_from_hf_config(config)
    source = read_state_dict(weights_path)
    arch = _detect_decoder_from_hf_weights(source, arch, weights_path)
    state = _apply_rules(
        source,
        transformers_rules(arch),
        _expected_shapes(arch),
        ignorable=_HF_DERIVED_KEYS,
        what=str(weights_path),
        dtype=dtype,
        skip=lambda key: component_of(key, arch) not in components,
    )
    return build_model(arch, state, dtype, components), [config_path, weights_path], arch


def _detect_decoder_from_hf_weights(
    source: StateDict, arch: ArchitectureSpec, path: Path
) -> ArchitectureSpec:
    """The weights, not the config, decide the decoder variant (reduce dim, head kind)."""
    film = source.get("decoder.film_mul.weight")
    if film is None:
        raise WeightsError(f"{path}: not a CLIPSeg checkpoint (no decoder.film_mul.weight)")
    refined = "decoder.transposed_convolution.0.weight" in source
    decoder = replace(arch.decoder, reduce_dim=film.shape[0], refined_head=refined)
    return replace(arch, decoder=decoder)


def load_original(
    decoder_path: Path,
    find_clip: Callable[[], Path],
    dtype: torch.dtype = torch.float32,
    components: frozenset[str] = COMPONENTS,
):
    """An original-repository decoder file + OpenAI CLIP weights -> (model, files, arch).

    ``find_clip`` gives the CLIP weights' path; it is asked only once the decoder file has been
    read, so a bad decoder file is reported before any attempt to find CLIP.
    """
    decoder_state = read_state_dict(decoder_path)
    decoder_spec = decoder_spec_from_original(decoder_state, str(decoder_path))
    clip_path = find_clip()
    clip_state = read_state_dict(clip_path)
    arch = architecture_from_openai_clip(clip_state, decoder_spec)
    expected = _expected_shapes(arch)
    state: dict[str, torch.Tensor] = {}
    # Both files use our names below a prefix: CLIP's under backbone.clip., the decoder's under
    # decoder.; each is checked on its own so an error names the file at fault.
    for source, prefix, ignorable, path in (
        (clip_state, "backbone.clip.", OPENAI_METADATA_KEYS, clip_path),
        (decoder_state, "decoder.", _ORIGINAL_UNUSED_KEYS, decoder_path),
    ):
        part = {k: v for k, v in expected.items() if k.startswith(prefix)}
        state |= _apply_rules(
            source,
            _identity_rules(part, prefix),
            part,
            ignorable=ignorable,
            what=str(path),
            dtype=dtype,
            skip=lambda key: component_of(key, arch) not in components,
        )
    model = build_model(arch, state, dtype, components)
    return model, [decoder_path, clip_path], arch


def _invert(rule: _Rule, tensor: torch.Tensor) -> list[torch.Tensor]:
    if rule.combine is _concat:
        return list(tensor.chunk(len(rule.sources), dim=0))
    if rule.combine is _transpose:
        return [tensor.t().contiguous()]
    return [tensor]


def hf_config_from_architecture(arch: ArchitectureSpec) -> dict:
    """A transformers ``CLIPSegConfig`` dict for ``arch`` (inverse of
    :func:`architecture_from_hf_config`); ``clipseg_input_size`` is ours, ignored by
    transformers."""
    vision, text, decoder = arch.vision, arch.text, arch.decoder
    return {
        "model_type": "clipseg",
        "architectures": ["CLIPSegForImageSegmentation"],
        "projection_dim": arch.embed_dim,
        "extract_layers": list(decoder.extract_layers),
        "reduce_dim": decoder.reduce_dim,
        "decoder_num_attention_heads": decoder.heads,
        "decoder_intermediate_size": decoder.feedforward_dim,
        "conditional_layer": 0,
        "use_complex_transposed_convolution": decoder.refined_head,
        "clipseg_input_size": arch.input_size,
        "vision_config": {
            "hidden_size": vision.width,
            "intermediate_size": round(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            "patch_size": vision.patch_size,
            "image_size": vision.pretrain_image_size,
            "hidden_act": "quick_gelu",
        },
        "text_config": {
            "hidden_size": text.width,
            "intermediate_size": round(text.width * text.mlp_ratio),
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "vocab_size": text.vocab_size,
            "hidden_act": "quick_gelu",
            "eos_token_id": 49407,
        },
    }


def save_transformers_dir(
    model: ClipSegModel, directory: Path, dtype: torch.dtype | None = None
) -> Path:
    """Write ``model`` as ``config.json`` + ``model.safetensors`` in transformers' layout, which
    ``--model DIR`` (and ``CLIPSegForImageSegmentation.from_pretrained``) load."""
    from safetensors.torch import save_file

    arch = model.arch
    ours = model.state_dict()
    theirs: dict[str, torch.Tensor] = {}
    for rule in transformers_rules(arch):
        tensor = ours[rule.ours].detach().cpu()
        if dtype is not None:
            tensor = tensor.to(dtype)
        for key, part in zip(rule.sources, _invert(rule, tensor), strict=True):
            theirs[key] = part.contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(theirs, str(directory / "model.safetensors"))
    config = json.dumps(hf_config_from_architecture(arch), indent=2)
    (directory / "config.json").write_text(config + "\n")
    return directory
