"""CLIP's byte-pair tokenizer without torch: prompt texts -> int64 token ids ``[K, L]``.

The same algorithm as open_clip's ``SimpleTokenizer`` (itself OpenAI CLIP's), token for token:
ftfy's ``fix_text``, HTML entities unescaped twice, whitespace collapsed, lower case; split by
CLIP's regex (contractions, letter runs, single digits, other non-space runs; the start and
end-of-text markers are tokens too); each piece's UTF-8 bytes mapped to printable characters and
merged by rank (byte-level BPE); then ``<start_of_text> ... <end_of_text>``, zero padding, and
for texts longer than the context the first ``L`` ids with end-of-text put last, as open_clip
truncates. tests/test_tokenizer.py checks every id against open_clip's on a few hundred texts.

The vocabulary is open_clip's ``bpe_simple_vocab_16e6.txt.gz``, read from the installed
package's folder without importing open_clip (whose ``__init__`` imports torch): a CPU run that
embeds a new prompt through the ONNX text graph never loads torch.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

#: OpenAI CLIP's context length (every CLIP text tower this project knows).
DEFAULT_CONTEXT_LENGTH = 77
VOCABULARY_FILE = "bpe_simple_vocab_16e6.txt.gz"
START, END = "<start_of_text>", "<end_of_text>"
#: The merges CLIP uses: the file's lines 1 .. 48894 (49152 ids - 256 bytes - 256 byte-ends - 2
#: markers, as open_clip reads it).
_MERGES = 49152 - 256 - 2


def vocabulary_path() -> Path:
    """open_clip's bundled BPE vocabulary, found by the package's import spec (no import).

    Raises:
        FileNotFoundError: open_clip is not installed, or its folder lacks the file.
    """
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / VOCABULARY_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary {VOCABULARY_FILE} was not found: it ships with open_clip_torch "
        "(pip install open_clip_torch)"
    )


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character (printable Latin-1 bytes map to themselves, the
    others to code points from 256 on), so that BPE works on strings without spaces or
    control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


@functools.cache
def _vocabulary(path: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(token -> id, merge pair -> rank) from a vocabulary file; read once per process."""
    with gzip.open(path) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [symbol + "</w>" for symbol in symbols]
    vocab += ["".join(merge) for merge in merges]
    vocab += [START, END]
    encoder = {token: index for index, token in enumerate(vocab)}
    ranks = {merge: rank for rank, merge in enumerate(merges)}
    return encoder, ranks


def clean(text: str) -> str:
    """open_clip's ``lower`` cleaning: ftfy, HTML unescaped twice, whitespace collapsed, lower
    case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class BpeTokenizer:
    """CLIP's tokenizer: :meth:`encode` one text to ids, call on texts for ``[K, L]`` int64.

    Args:
        context_length: L, the text tower's positions.
        vocabulary: the ``bpe_simple_vocab_16e6.txt.gz`` file (default: open_clip's).

    Raises:
        FileNotFoundError: no vocabulary file.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, vocabulary=None) -> None:
        if context_length < 2:
            raise ValueError(f"context length {context_length}: needs room for the two markers")
        self.context_length = context_length
        self.encoder, self.ranks = _vocabulary(Path(vocabulary or vocabulary_path()))
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self._bytes = bytes_to_unicode()
        # The markers are pieces of their own (a prompt that spells one gets its id, as CLIP's).
        self._pieces: dict[str, tuple[str, ...]] = {START: (START,), END: (END,)}
        self._pattern = regex.compile(
            rf"{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """One regex piece (as byte characters) -> its BPE symbols, the last ending in
        ``</w>``; merges the lowest-ranked adjacent pair everywhere until none is known."""
        cached = self._pieces.get(piece)
        if cached is not None:
            return cached
        word = (*piece[:-1], piece[-1] + "</w>")
        ranks = self.ranks
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self._pieces[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """The ids of one text's tokens, without markers or truncation."""
        ids: list[int] = []
        for piece in self._pattern.findall(clean(text)):
            chars = "".join(self._bytes[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self._bpe(chars))
        return ids

    def __call__(self, texts: str | Sequence[str], *, trim: bool = False) -> np.ndarray:
        """int64 ``[K, L]``: start, the text's ids, end-of-text, zeros; a text too long keeps
        its first ``L - 1`` ids and end-of-text (open_clip's truncation).

        ``trim=True`` cuts the columns after the longest text's end-of-text id (see
        :class:`clipseg_cli.model.tokenizer.ClipTokenizer`).
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length
        out = np.zeros((len(texts), length), np.int64)
        longest = 0
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text), self.end_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.end_id
            out[row, : len(ids)] = ids
            longest = max(longest, len(ids))
        return out[:, :longest] if trim else out
