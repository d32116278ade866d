"""CLIP's tokenizer for the torch model: prompt texts -> token ids ``[K, L]`` as a tensor.

The one tokenizer of the package is :class:`clipseg_cli.ops.tokenizer.BpeTokenizer` (torch-free,
numpy out, the same ids as open_clip's ``SimpleTokenizer``); this wraps its arrays as tensors.
The Python API and ``segment`` use it at the full context length, training with ``trim=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipseg_cli.ops.tokenizer import BpeTokenizer


class ClipTokenizer:
    """CLIP's byte-pair tokenizer for a text tower of ``context_length`` positions."""

    def __init__(self, context_length: int) -> None:
        self._tokenizer = BpeTokenizer(context_length)

    def __call__(self, prompts: Sequence[str], *, trim: bool = False) -> torch.Tensor:
        """Token ids ``[K, context_length]`` (start, text, end-of-text, zero padding).

        ``trim=True`` cuts the padding after the longest prompt's end-of-text token (L <= the
        context length): the causal text tower then gives the same embeddings up to float
        rounding (about 1e-6), several times faster for short prompts. Training trims; segment
        runs keep the full length, which is what the reference implementation computes.
        """
        return torch.from_numpy(self._tokenizer(list(prompts), trim=trim))
