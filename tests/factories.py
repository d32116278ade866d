"""Random CLIPSeg checkpoints in the real formats, built offline (tests and benchmarks only).

The reference is transformers' ``CLIPSegForImageSegmentation``: we build it from a config with
random, well-spread weights and save it with ``save_pretrained``. The original-repository layout
is written from the same tensors by an explicit mapping kept here, independent of
``clipseg_cli.weights``, so a mistake there cannot be mirrored here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

FULL = {
    "vision": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "patch_size": 16,
        "image_size": 224,
    },
    "text": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
    },
    "projection_dim": 512,
    "decoder_intermediate_size": 2048,
    "decoder_num_attention_heads": 4,
}
# Small enough to run in milliseconds, large enough to keep every structural feature: 10 vision
# blocks (the decoder reads 3, 6, 9), 64-wide heads (OpenAI's convention, which the original
# layout relies on), the real 49408-token vocabulary so the real tokenizer works.
TINY = {
    "vision": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 10,
        "num_attention_heads": 1,
        "patch_size": 16,
        "image_size": 224,
    },
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
    },
    "projection_dim": 64,
    "decoder_intermediate_size": 96,
    "decoder_num_attention_heads": 4,
}
VARIANTS = {
    "rd64-refined": {"reduce_dim": 64, "use_complex_transposed_convolution": True},
    "rd64": {"reduce_dim": 64, "use_complex_transposed_convolution": False},
    "rd16": {"reduce_dim": 16, "use_complex_transposed_convolution": False},
}


def clipseg_config(variant: str = "rd64-refined", size: str = "full") -> CLIPSegConfig:
    dims = FULL if size == "full" else TINY
    return CLIPSegConfig(
        text_config={**dims["text"], "max_position_embeddings": 77, "vocab_size": 49408},
        vision_config=dims["vision"],
        projection_dim=dims["projection_dim"],
        extract_layers=[3, 6, 9],
        decoder_intermediate_size=dims["decoder_intermediate_size"],
        decoder_num_attention_heads=dims["decoder_num_attention_heads"],
        **VARIANTS[variant],
    )


@torch.no_grad()
def spread_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every tensor so that no two are alike and none is trivial.

    Weights ~ N(0, 1/fan_in) keep a deep random network in a sane range; LayerNorm scales in
    [0.5, 1.5] and non-zero biases make a swapped or dropped norm/bias visible in the output.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.ndim >= 2:
            fan_in = param[0].numel()
            std = 1.0 / fan_in**0.5
            if "embedding" in name:
                std = 0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        elif name.endswith("weight") and ("norm" in name or "layrnorm" in name):
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        elif name.endswith("logit_scale"):
            param.fill_(2.5)
        else:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def random_hf_model(
    variant: str = "rd64-refined", size: str = "full", seed: int = 0
) -> CLIPSegForImageSegmentation:
    """transformers' CLIPSeg with random spread weights, eval mode, float32, eager attention."""
    config = clipseg_config(variant, size)
    config._attn_implementation = "eager"
    model = CLIPSegForImageSegmentation(config)
    spread_(model, seed)
    return model.eval()


def save_random_hf_checkpoint(
    directory: Path, variant: str = "rd64-refined", size: str = "full", seed: int = 0
) -> Path:
    """``save_pretrained`` a random model into ``directory`` (safetensors); returns it."""
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        random_hf_model(variant, size, seed).save_pretrained(directory)
    return directory


def _qkv(state: dict, prefix: str, param: str) -> torch.Tensor:
    return torch.cat([state[f"{prefix}.{p}_proj.{param}"] for p in "qkv"])


def hf_to_original(state: dict[str, torch.Tensor]):
    """transformers keys -> (original decoder state dict, OpenAI CLIP state dict)."""
    clip: dict[str, torch.Tensor] = {}
    hv, ht = "clip.vision_model", "clip.text_model"
    clip["visual.conv1.weight"] = state[f"{hv}.embeddings.patch_embedding.weight"]
    clip["visual.class_embedding"] = state[f"{hv}.embeddings.class_embedding"]
    clip["visual.positional_embedding"] = state[f"{hv}.embeddings.position_embedding.weight"]
    clip["visual.proj"] = state["clip.visual_projection.weight"].t().contiguous()
    clip["token_embedding.weight"] = state[f"{ht}.embeddings.token_embedding.weight"]
    clip["positional_embedding"] = state[f"{ht}.embeddings.position_embedding.weight"]
    clip["text_projection"] = state["clip.text_projection.weight"].t().contiguous()
    clip["logit_scale"] = state["clip.logit_scale"]
    for p in ("weight", "bias"):
        clip[f"visual.ln_pre.{p}"] = state[f"{hv}.pre_layrnorm.{p}"]
        clip[f"visual.ln_post.{p}"] = state[f"{hv}.post_layernorm.{p}"]
        clip[f"ln_final.{p}"] = state[f"{ht}.final_layer_norm.{p}"]
    for ours, theirs in (("visual.transformer", hv), ("transformer", ht)):
        i = 0
        while f"{theirs}.encoder.layers.{i}.layer_norm1.weight" in state:
            src, dst = f"{theirs}.encoder.layers.{i}", f"{ours}.resblocks.{i}"
            for p in ("weight", "bias"):
                clip[f"{dst}.attn.in_proj_{p}"] = _qkv(state, f"{src}.self_attn", p)
                clip[f"{dst}.attn.out_proj.{p}"] = state[f"{src}.self_attn.out_proj.{p}"]
                clip[f"{dst}.ln_1.{p}"] = state[f"{src}.layer_norm1.{p}"]
                clip[f"{dst}.ln_2.{p}"] = state[f"{src}.layer_norm2.{p}"]
                clip[f"{dst}.mlp.c_fc.{p}"] = state[f"{src}.mlp.fc1.{p}"]
                clip[f"{dst}.mlp.c_proj.{p}"] = state[f"{src}.mlp.fc2.{p}"]
            i += 1
    clip["input_resolution"] = torch.tensor(224)  # OpenAI's dicts carry these scalars
    clip["context_length"] = torch.tensor(77)
    clip["vocab_size"] = torch.tensor(49408)

    decoder: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith("decoder."):
            continue
        name = key[len("decoder.") :]
        name = name.replace("transposed_convolution", "trans_conv")
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj"):
                continue
            if rest.startswith("self_attn.v_proj."):
                p = rest.rsplit(".", 1)[1]
                decoder[f"blocks.{i}.self_attn.in_proj_{p}"] = _qkv(
                    state, f"decoder.layers.{i}.self_attn", p
                )
                continue
            rest = (
                rest.replace("layer_norm1", "norm1")
                .replace("layer_norm2", "norm2")
                .replace("mlp.fc1", "linear1")
                .replace("mlp.fc2", "linear2")
            )
            name = f"blocks.{i}.{rest}"
        decoder[name] = value
    # The original decoder has an unused `reduce` layer that the released files carry.
    width = state[f"{hv}.pre_layrnorm.weight"].shape[0]
    reduce_dim = state["decoder.film_mul.weight"].shape[0]
    decoder["reduce.weight"] = torch.zeros(reduce_dim, width)
    decoder["reduce.bias"] = torch.zeros(reduce_dim)
    return decoder, clip


def save_original_checkpoint(model: CLIPSegForImageSegmentation, directory: Path, name: str):
    """Write ``name`` (decoder .pth) and ``clip-vit-b16.pt`` (OpenAI CLIP dict) as pickles."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    decoder, clip = hf_to_original(model.state_dict())
    decoder_path, clip_path = directory / name, directory / "clip-vit-b16.pt"
    torch.save(decoder, decoder_path)
    torch.save(clip, clip_path)
    return decoder_path, clip_path
