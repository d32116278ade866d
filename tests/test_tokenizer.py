"""The package's torch-free CLIP tokenizer (clipseg_cli.ops.tokenizer) against open_clip's
``SimpleTokenizer``: every id of every row, on a few hundred varied texts."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from clipseg_cli.model.tokenizer import ClipTokenizer
from clipseg_cli.ops.tokenizer import BpeTokenizer, vocabulary_path

HANDWRITTEN = [
    "",
    " ",
    "\t\n \u00a0\u3000",
    "a dog",
    "A DOG",
    "  a   dog \n on\tthe  grass ",
    "a photo of a cat.",
    "it's the dog's ball, isn't it? we'll see; they'd've",
    "IT'S LOUD",
    "ice-cream, t-shirt & jeans / 3.5 kg @ 10:30pm #tag",
    "1234567890 2024-12-06 0.001 1e-5 $99.99 50%",
    "café naïve façade jalapeño Ærøskøbing Straße",
    "Ελληνικά κείμενα, русский текст, עברית, العربية",
    "日本語のテキスト 中文文本 한국어",
    "emoji 🐶🐱🚗 and 👩‍👩‍👧 family, flags 🇫🇷🇯🇵, skin 👍🏽",
    "combining e\u0301 vs \u00e9, ligature \ufb01sh, full-width Ａ Ｂ １",
    "mojibake: cafÃ© â€œquotedâ€\x9d",
    "html &amp; entities &lt;b&gt; &amp;amp; &#39;s &eacute;",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "control \x00 \x07 \x1b[31mred\x1b[0m chars",
    "<start_of_text>",
    "a <end_of_text> inside",
    "<START_OF_TEXT> upper markers <End_Of_Text>",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "word " * 100,
    "a red circle, " * 30,
    "!!!???...,,,;;;:::---___***",
    "'s 't 're 've 'm 'll 'd",
    "a\u2028line\u2029separator\x85nel",
    "\U0001d400\U0001d401 math bold, \u2460\u2461 circled digits, Ⅻ roman",
    "tab\tseparated\tvalues\r\nwindows",
]

ALPHABET = (
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 "
    ".,;:!?'\"-_()[]{}<>/\\|@#$%^&*+=~`  \t\n"
    "éèêëàâäîïôöùûüçñßøåæœ ÉÀÇÑ αβγδ абвгд 日本語中文한국 ٠١٢ 🐶🐱🚗🌳✨ "
    "\u00a0\u200b\u0301&amp;&lt;"
)


def varied_texts(count: int = 300, seed: int = 22) -> list[str]:
    """The handwritten cases and random strings over a mixed alphabet (short to very long)."""
    rng = random.Random(seed)
    texts = list(HANDWRITTEN)
    words = ["a", "dog", "the", "photo", "of", "red", "circle", "blue", "square", "café"]
    while len(texts) < count:
        if rng.random() < 0.5:
            length = rng.choice([1, 3, 10, 40, 120, 400])
            texts.append("".join(rng.choice(ALPHABET) for _ in range(length)))
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 90))))
    return texts


@pytest.fixture(scope="module")
def theirs() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=77)


@pytest.fixture(scope="module")
def ours() -> BpeTokenizer:
    return BpeTokenizer(77)


def test_the_ids_equal_open_clips_on_varied_texts(ours, theirs):
    texts = varied_texts()
    assert len(texts) >= 300 and any(len(theirs.encode(t)) > 100 for t in texts)
    mine, reference = ours(texts), theirs(texts).numpy()
    assert mine.dtype == np.int64 and mine.shape == reference.shape == (len(texts), 77)
    differ = [texts[i] for i in np.flatnonzero((mine != reference).any(axis=1))]
    assert not differ, f"{len(differ)} texts tokenized differently, e.g. {differ[:3]!r}"
    for text in texts[:60]:  # and one text at a time, with the same encode()
        assert ours.encode(text) == theirs.encode(text), repr(text)


def test_truncation_keeps_end_of_text_last_at_any_context_length(theirs):
    texts = ["word " * 100, "a dog", "1" * 300, ""]
    for length in (2, 5, 16, 77):
        mine = BpeTokenizer(length)(texts)
        reference = theirs(texts, context_length=length).numpy()
        np.testing.assert_array_equal(mine, reference)
        assert (mine[0, -1], mine[2, -1]) == (49407, 49407)


def test_trim_cuts_after_the_longest_end_of_text_and_the_wrapper_gives_tensors():
    tokens = ClipTokenizer(77)(["a dog", "a big red circle"], trim=True)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 6)
    assert tokens[1, -1] == 49407 and tokens[0, 3] == 49407 and tokens[0, 4:].eq(0).all()
    full = ClipTokenizer(77)(["a dog"])
    assert full.shape == (1, 77) and torch.equal(full[0, :4], tokens[0, :4])


def test_the_vocabulary_is_found_without_importing_open_clip_or_torch():
    code = (
        "import sys\n"
        "from clipseg_cli.ops.tokenizer import BpeTokenizer\n"
        "ids = BpeTokenizer(77)(['a dog'])\n"
        "print(ids[0, :4].tolist(), 'torch' in sys.modules, 'open_clip' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("]")[-1].split() == ["False", "False"], done.stdout
    assert done.stdout.startswith("[49406, 320, 1929, 49407]")
    assert vocabulary_path().name == "bpe_simple_vocab_16e6.txt.gz"
