"""The text tower's ONNX graph (clipseg_cli.backends.text): parity with the torch tower, only
text weights in it, and the graph cache's cases (cached, corrupt -> rebuilt, read-only ->
in memory with one warning)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from factories import save_random_hf_checkpoint

import clipseg_cli.backends.cache as cache
import clipseg_cli.backends.export as export
from clipseg_cli.backends.base import BackendError
from clipseg_cli.backends.text import OnnxTextEncoder, open_text_encoder
from clipseg_cli.model.tokenizer import ClipTokenizer
from clipseg_cli.weights import load_weights

TEXT = frozenset({"text"})
SHA = "cd" * 32
PROMPTS = [
    "a dog",
    "a red circle",
    "the blue square on the left, next to a yellow triangle",
    "",
    "café 🐶 naïve 日本語",
    "word " * 100,  # truncated at 77 ids
    "A DOG",
]


@torch.inference_mode()
def _torch_conditionals(model, prompts) -> np.ndarray:
    """What ``Segmenter.embed_texts`` computes on a float32 model."""
    tokens = ClipTokenizer(model.arch.text.context_length)(prompts)
    return model.encode_text(tokens).float().numpy()


def _assert_parity(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    scale = np.abs(theirs).max()
    assert scale > 0 and theirs.std(axis=0).max() > 1e-3 * scale  # prompts really differ
    assert np.abs(ours - theirs).max() <= 1e-4 * scale


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A tiny random checkpoint's text tower and its exported graph."""
    folder = tmp_path_factory.mktemp("tiny-text")
    save_random_hf_checkpoint(folder, "rd64", size="tiny", seed=31)
    model, _ = load_weights(str(folder), components=TEXT)
    return model, export.export_text_graph_bytes(model)


@pytest.mark.parametrize("source", ["tiny", "demo"])
def test_the_text_graph_gives_the_torch_towers_conditionals(source, tiny_text):
    if source == "tiny":
        model, graph = tiny_text
    else:
        model, _ = load_weights("demo", components=TEXT)
        graph = export.export_text_graph_bytes(model)
    encoder = OnnxTextEncoder(graph)
    assert (encoder.context_length, encoder.embed_dim) == (77, model.arch.embed_dim)
    _assert_parity(encoder.embed_texts(PROMPTS), _torch_conditionals(model, PROMPTS))
    for count in (1, 2):  # K is dynamic, and 1 is not specialised away
        _assert_parity(
            encoder.embed_texts([*PROMPTS[:count], "x"]),
            _torch_conditionals(model, [*PROMPTS[:count], "x"]),
        )
    assert encoder.embed_texts([]).shape == (0, model.arch.embed_dim)


def test_only_the_text_towers_weights_are_in_the_graph(tiny_text):
    model, graph = tiny_text
    weights = sum(int(np.prod(t.dims)) for t in onnx.load_from_string(graph).graph.initializer)
    text = model.backbone.clip
    tower = sum(
        p.numel()
        for module in (text.transformer, text.token_embedding, text.ln_final)
        for p in module.parameters()
    )
    tower += text.positional_embedding.numel() + text.text_projection.numel()
    # The tower's own parameters, plus a few constants (the causal mask per block, shapes); no
    # vision block, decoder or image head: one vision block of this model alone adds 49 k.
    assert tower <= weights <= tower + model.arch.text.layers * 77 * 77 + 1000


def _no_model():
    raise AssertionError("the model must not be loaded when the text graph is cached")


@pytest.fixture
def fake_export(tiny_text, monkeypatch):
    """The text exporter replaced by one that returns the tiny graph; counts calls."""
    model, graph = tiny_text
    calls = []

    def timed_text_export(exported_model):
        calls.append(exported_model)
        return graph, 0.01

    monkeypatch.setattr(export, "timed_text_export", timed_text_export)
    return model, graph, calls


def test_the_text_graph_is_exported_once_then_read_from_the_cache(cache_dir, fake_export):
    model, graph, calls = fake_export
    arch = model.arch
    messages: list[str] = []
    first = open_text_encoder(SHA, arch, lambda: model, label="tiny", on_progress=messages.append)
    assert first.built == ("text-export",) and len(calls) == 1
    assert first.path is not None and first.path.read_bytes() == graph
    assert (
        first.path == cache.cached_graph(SHA, arch, "text") != cache.cached_graph(SHA, arch, "fp32")
    )
    assert messages[0].startswith("exporting the text graph of tiny for ONNX Runtime (once, ~")
    assert messages[1].startswith("exported the text graph of tiny in ")
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["variant"] == "text" and sidecar["size"] == len(graph)
    messages.clear()
    second = open_text_encoder(SHA, arch, _no_model, on_progress=messages.append)
    assert second.built == () and second.path == first.path and not messages
    _assert_parity(second.encoder.embed_texts(PROMPTS), _torch_conditionals(model, PROMPTS))


def _damage(how: str, path: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif how == "no sidecar":
        path.with_suffix(".json").unlink()
    elif how == "not a graph, sidecar matching":
        cache.store_graph(path.stem, b"\x08\x07garbage" * 100, {})
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["truncated", "flipped byte", "no sidecar", "not a graph, sidecar matching"]
)
def test_a_damaged_text_graph_is_rebuilt(cache_dir, fake_export, how):
    model, graph, calls = fake_export
    path = open_text_encoder(SHA, model.arch, lambda: model).path
    _damage(how, path)
    messages: list[str] = []
    rebuilt = open_text_encoder(SHA, model.arch, lambda: model, on_progress=messages.append)
    assert rebuilt.built == ("text-export",) and len(calls) == 2
    assert any("rebuilding" in message for message in messages), messages
    assert path.read_bytes() == graph and cache.verify_graph(path.stem) == (path, None)
    _assert_parity(rebuilt.encoder.embed_texts(PROMPTS), _torch_conditionals(model, PROMPTS))


def test_a_read_only_cache_keeps_the_text_graph_in_memory_with_one_warning(
    cache_dir, fake_export, monkeypatch
):
    model, _, calls = fake_export
    cache_dir.mkdir(parents=True)

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache, "write_bytes_atomic", refuse)
    monkeypatch.setattr(cache, "write_json_atomic", refuse)
    for _ in range(2):
        loaded = open_text_encoder(SHA, model.arch, lambda: model, label="tiny")
        assert loaded.path is None and loaded.encoder.path is None
        (warning,) = loaded.warnings
        assert "\n" not in warning and "not writable" in warning and "kept in memory" in warning
        _assert_parity(loaded.encoder.embed_texts(PROMPTS), _torch_conditionals(model, PROMPTS))
    assert len(calls) == 2 and not list(cache_dir.rglob("*.onnx"))


def test_an_image_graph_is_not_a_text_graph():
    from clipseg_cli.backends.onnx import open_graph

    model, info = load_weights("demo")
    # The demo model's image graph as every run finds it: in the test session's graph cache
    # (exported there once for all the tests that use it).
    image_graph = open_graph(info.sha256, model.arch, lambda: model, lambda graph: graph).backend
    with pytest.raises(BackendError, match="not a CLIPSeg text graph"):
        OnnxTextEncoder(image_graph)
    with pytest.raises(BackendError, match="cannot load"):
        OnnxTextEncoder(b"\x08\x07garbage")
