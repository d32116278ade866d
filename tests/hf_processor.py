"""Build a ``transformers.CLIPSegProcessor`` fully offline.

The benchmark's reference script (and any parity test) wants to load a processor with
``CLIPSegProcessor.from_pretrained(dir)`` exactly like a transformers user would, but this
machine cannot reach the Hugging Face hub. So we recreate the processor of
``CIDAS/clipseg-rd64-refined`` from things that are installed locally:

* the image processor's settings are copied from that repository's ``preprocessor_config.json``;
* the tokenizer is OpenAI CLIP's BPE, rebuilt from the vocabulary file that ``open_clip`` ships
  (``bpe_simple_vocab_16e6.txt.gz``), using the same recipe as CLIP's ``SimpleTokenizer``, so
  token ids match open_clip's tokenizer (and therefore the hub's ``vocab.json``) exactly.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from transformers import (
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessor,
    ViTImageProcessorPil,
)

# CLIP's BPE file has a header line, then merges; CLIP keeps exactly this many of them so that
# 256 bytes + 256 "</w>" bytes + merges + 2 special tokens = 49408 vocabulary entries.
_N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77


def _bpe_path() -> Path:
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode character table.

    Copied in spirit from CLIP (and GPT-2): printable latin-1 bytes map to themselves, the rest
    are shifted above 255 so that BPE never sees whitespace/control characters. The order of the
    returned dict matters: it is the order of the first 256 vocabulary entries.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Return CLIP's (vocab token -> id, merges as "a b" lines), exactly as CLIP defines them."""
    with gzip.open(_bpe_path()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # Duplicates would silently shift every later id; CLIP's file has none, so fail loudly if a
    # different bpe file ever shows up.
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"expected {VOCAB_SIZE} CLIP tokens, built {len(vocab)}")
    return vocab, merges


def write_clip_vocab_files(directory: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` in the layout of OpenAI CLIP's HF tokenizer."""
    vocab, merges = clip_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The "#version" header is what HF's BPE loaders expect on the first line of merges.txt.
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with the special-token setup of the CIDAS/clipseg repositories.

    Note the pad token is ``<|endoftext|>`` (id 49407) like on the hub, whereas open_clip pads
    with 0; CLIP's causal attention mask means tokens after the end token never affect the
    features, so both paddings give the same model output.
    """
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_clip_vocab_files(Path(tmp))
        # Going through vocab/merges files (rather than passing dicts) exercises the same loading
        # path as a hub checkout, and works with both the slow and the tokenizers-backed class.
        tokenizer = CLIPTokenizer(
            vocab=str(vocab_path),
            merges=str(merges_path),
            unk_token=END_TOKEN,
            bos_token=START_TOKEN,
            eos_token=END_TOKEN,
            pad_token=END_TOKEN,
            model_max_length=CONTEXT_LENGTH,
        )
    return tokenizer


#: The image preprocessor settings of CIDAS/clipseg-rd64-refined (its preprocessor_config.json).
IMAGE_PROCESSOR_SETTINGS = {
    "do_resize": True,
    "size": {"height": 352, "width": 352},
    "resample": Image.Resampling.BILINEAR,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def build_image_processor() -> ViTImageProcessor:
    """transformers' default (torchvision-backed) processor with the hub checkpoint's settings."""
    return ViTImageProcessor(**IMAGE_PROCESSOR_SETTINGS)


def build_pil_image_processor() -> ViTImageProcessorPil:
    """The PIL-backed processor with the hub checkpoint's settings: the one whose pixels ours
    equal exactly."""
    return ViTImageProcessorPil(**IMAGE_PROCESSOR_SETTINGS)


def reference_pixels(image: Image.Image | np.ndarray) -> torch.Tensor:
    """float32 [1, 3, 352, 352]: a Pillow image (converted to RGB) or a uint8 [H, W, 3] array
    as the PIL processor gives it."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    return build_pil_image_processor()(images=image, return_tensors="pt")["pixel_values"]


def build_clipseg_processor() -> CLIPSegProcessor:
    return CLIPSegProcessor(
        image_processor=build_image_processor(), tokenizer=build_clip_tokenizer()
    )


def save_clipseg_processor(directory: Path) -> None:
    """Save an offline-built CLIPSegProcessor into ``directory`` (usually next to the weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    build_clipseg_processor().save_pretrained(str(directory))
