"""CLIP's tokenizer: prompt texts -> token ids ``[K, L]`` for the text tower.

The one tokenizer of the package (open_clip's BPE ``SimpleTokenizer``, which reads its
vocabulary once when built): the Python API and ``segment`` use it at the full context length,
training with ``trim=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ClipTokenizer:
    """CLIP's byte-pair tokenizer for a text tower of ``context_length`` positions."""

    def __init__(self, context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._tokenizer = SimpleTokenizer(context_length=context_length)

    def __call__(self, prompts: Sequence[str], *, trim: bool = False) -> torch.Tensor:
        """Token ids ``[K, context_length]`` (start, text, end-of-text, zero padding).

        ``trim=True`` cuts the padding after the longest prompt's end-of-text token (L <= the
        context length): the causal text tower then gives the same embeddings up to float
        rounding (about 1e-6), several times faster for short prompts. Training trims; segment
        runs keep the full length, which is what the reference implementation computes.
        """
        tokens = self._tokenizer(list(prompts))
        if trim:
            tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
        return tokens
