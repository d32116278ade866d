"""The image backends (clipseg_cli.backends): ONNX Runtime against torch, the graph cache, the
int8 graph, the text-embedding cache, and the ONNX side's independence from torch.

Exports are the slow part (~10 s each, whatever the model's size): one per tiny variant, shared
by the module; the cache tests swap the exporter for one that returns the already exported
bytes, except the two-process test, which exports for real in both processes.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
from factories import save_random_hf_checkpoint

import clipseg_cli.backends.cache as cache
import clipseg_cli.backends.export as export
import clipseg_cli.backends.openvino as openvino_backend
from clipseg_cli.backends.base import BackendError
from clipseg_cli.backends.machine import native_bf16
from clipseg_cli.backends.onnx import (
    OnnxImageBackend,
    available_cores,
    open_onnx_backend,
    session_options,
)
from clipseg_cli.backends.openvino import OpenVinoImageBackend
from clipseg_cli.backends.quantize import quantize_int8
from clipseg_cli.backends.torch import TorchImageBackend
from clipseg_cli.io.files import sha256_file
from clipseg_cli.model.tokenizer import ClipTokenizer
from clipseg_cli.ops.transforms import resize_rgb
from clipseg_cli.specs import TINY
from clipseg_cli.weights import load_weights

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ["rd64-refined", "rd64", "rd16"]
PROMPTS = ["a dog", "the blue square on the left", "something shiny", "a cat", "sky"]
SHA = "ab" * 32  # a weights sha256 for the cache tests


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _images(seed: int, count: int, size: int) -> np.ndarray:
    """``count`` non-square source images (different shapes), resized to the model input."""
    rng = np.random.default_rng(seed)
    shapes = [(200, 300), (411, 257), (96, 160)]
    images = []
    for i in range(count):
        height, width = shapes[i % len(shapes)]
        smooth = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        big = np.kron(smooth, np.ones((8, 8, 1), np.uint8))[:height, :width]
        noisy = np.clip(big + rng.normal(0, 12, big.shape), 0, 255).astype(np.uint8)
        images.append(resize_rgb(noisy, (size, size)))
    return np.stack(images)


@torch.inference_mode()
def _conditionals(model, kind: str, count: int, seed: int) -> np.ndarray:
    """Text (``model.encode_text``) or image (``model.encode_image``) conditionals."""
    if kind == "text":
        tokens = ClipTokenizer(model.arch.text.context_length)(PROMPTS[:count])
        return model.encode_text(tokens).float().numpy()
    support = torch.from_numpy(_images(seed + 100, count, model.arch.input_size))
    return model.encode_image(model.normalize(support)).float().numpy()


def _assert_same(onnx_logits: np.ndarray, torch_logits: np.ndarray) -> None:
    """Logits equal to 1e-4 of their magnitude; masks at a non-trivial threshold (the median
    probability of the torch logits) agree with IoU >= 0.999."""
    assert onnx_logits.dtype == np.float32
    assert onnx_logits.shape == torch_logits.shape
    scale = np.abs(torch_logits).max()
    assert torch_logits.std() > 1e-3 * scale  # not a constant map
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-4 * scale
    threshold = np.median(torch_logits)
    a, b = torch_logits > threshold, onnx_logits > threshold
    assert 0.05 < a.mean() < 0.95
    assert (a & b).sum() / (a | b).sum() >= 0.999


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------------------------------------
# Fixtures: one tiny checkpoint and one exported graph per variant, for the whole module
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(variant) -> (model, fp32 graph bytes)``; the model has every component."""
    built: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{variant}")
            seed = 20 + VARIANTS.index(variant)
            save_random_hf_checkpoint(folder, variant, size="tiny", seed=seed)
            model, info = load_weights(str(folder))
            built[variant] = (model, export.export_image_graph_bytes(model), info, folder)
        return built[variant][:2]

    get.info = lambda variant: built[variant][2]
    get.folder = lambda variant: built[variant][3]
    return get


@pytest.fixture
def fake_export(tiny, monkeypatch):
    """The exporter replaced by one that returns the tiny rd64-refined graph; counts calls."""
    model, graph = tiny("rd64-refined")
    calls = []

    def timed_export(exported_model):
        calls.append(exported_model)
        return graph, 0.01

    monkeypatch.setattr(export, "timed_export", timed_export)
    return model, graph, calls


def _no_model():
    raise AssertionError("the model was built although the graph is cached")


# ---------------------------------------------------------------------------------------------
# ONNX Runtime against torch
# ---------------------------------------------------------------------------------------------

CASES = [(1, 1, "text"), (3, 5, "text"), (3, 1, "image"), (1, 5, "image")]


def _runtime(name: str, graph, precision: str = "fp32"):
    """The CPU runtime ``name``'s backend on ``graph`` (path or bytes)."""
    if name == "openvino":
        return OpenVinoImageBackend(graph, precision=precision)
    return OnnxImageBackend(graph, variant=precision)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_runtimes_match_torch_on_tiny_models(tiny, variant, runtime):
    model, graph = tiny(variant)
    onnx_backend = _runtime(runtime, graph)
    torch_backend = TorchImageBackend(model, "cpu")
    assert onnx_backend.input_size == torch_backend.input_size == model.arch.input_size
    size = model.arch.input_size
    for index, (batch, prompts, kind) in enumerate(CASES):
        pixels = _images(index, batch, size)
        conditionals = _conditionals(model, kind, prompts, index)
        expected = torch_backend.logits(pixels, conditionals)
        assert expected.shape == (batch, prompts, size, size)
        _assert_same(onnx_backend.logits(pixels, conditionals), expected)


@pytest.mark.parity
@pytest.mark.slow  # 37 s: the tiny models above check every variant in `make test`
def test_cpu_runtimes_match_torch_on_the_full_size_model(tmp_path):
    folder = save_random_hf_checkpoint(tmp_path / "full", "rd64-refined", size="full", seed=31)
    model, _ = load_weights(str(folder))
    graph = export.export_image_graph(model, tmp_path / "full.onnx")
    torch_backend = TorchImageBackend(model, "cpu")
    # K = 5 mixes both kinds: three text conditionals, two image conditionals.
    conditionals = np.concatenate(
        [_conditionals(model, "text", 3, 0), _conditionals(model, "image", 2, 1)]
    )
    pixels = _images(2, 3, 352)
    expected = torch_backend.logits(pixels, conditionals)
    single = pixels[1:2], conditionals[4:5]
    expected_single = torch_backend.logits(*single)
    for runtime in ("onnx", "openvino"):
        backend = _runtime(runtime, graph)
        _assert_same(backend.logits(pixels, conditionals), expected)
        _assert_same(backend.logits(*single), expected_single)


def test_backends_check_their_inputs(tiny):
    model, graph = tiny("rd64-refined")
    size, dim = model.arch.input_size, model.arch.embed_dim
    for backend in (OnnxImageBackend(graph), TorchImageBackend(model)):
        good = np.zeros((1, size, size, 3), np.uint8)
        cond = np.zeros((2, dim), np.float64)  # float64 is accepted (cast to float32)
        assert backend.logits(good, cond).dtype == np.float32
        assert backend.logits(good[:0], cond).shape == (0, 2, size, size)
        assert backend.logits(good, cond[:0]).shape == (1, 0, size, size)
        with pytest.raises(ValueError, match="uint8"):
            backend.logits(good.astype(np.float32), cond)
        with pytest.raises(ValueError, match="input size"):
            backend.logits(np.zeros((1, size, size + 16, 3), np.uint8), cond)
        with pytest.raises(ValueError, match="D = "):
            backend.logits(good, np.zeros((2, dim + 1), np.float32))


def test_export_needs_a_float32_model(tiny):
    model, _ = tiny("rd64-refined")
    half = load_weights(str(tiny.folder("rd64-refined")), dtype=torch.bfloat16)[0]
    with pytest.raises(ValueError, match="float32"):
        export.export_image_graph_bytes(half)
    assert model.dtype == torch.float32


def test_session_uses_every_core_and_does_not_spin(tiny):
    _, graph = tiny("rd64-refined")
    options = OnnxImageBackend(graph).session.get_session_options()
    assert options.intra_op_num_threads == available_cores()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (
        session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning")
        == "1"
    )
    assert options.graph_optimization_level.name == "ORT_ENABLE_ALL"


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------


def test_int8_graph_is_smaller_and_agrees_with_fp32(tiny):
    model, graph = tiny("rd64-refined")
    int8 = quantize_int8(graph)
    assert len(int8) < len(graph)
    ops = Counter(node.op_type for node in onnx.load_from_string(int8).graph.node)
    # q/k/v, out, fc1, fc2 of every vision block that runs, at least
    assert ops["MatMulInteger"] >= 4 * (model.arch.last_needed_layer + 1), ops
    fp32_backend, int8_backend = OnnxImageBackend(graph), OnnxImageBackend(int8, variant="int8")
    pixels = _images(7, 3, model.arch.input_size)
    conditionals = _conditionals(model, "text", 5, 0)
    reference = fp32_backend.logits(pixels, conditionals)
    quantised = int8_backend.logits(pixels, conditionals)
    threshold = np.median(reference)
    assert _iou(reference > threshold, quantised > threshold) >= 0.9
    assert not np.array_equal(reference, quantised)  # it is another graph


def test_openvino_int8_keeps_the_weights_in_int8_and_agrees_with_fp32(
    tiny, cache_dir, tmp_path, monkeypatch
):
    """The tiny model's matrices are small: every one is compressed here (the floor is for the
    decoder's small projections of the full-size model)."""
    monkeypatch.setattr(openvino_backend, "MIN_COMPRESSED_WEIGHTS", 0)
    model, graph = tiny("rd64-refined")
    path = tmp_path / "graph.onnx"
    path.write_bytes(graph)
    int8 = OpenVinoImageBackend(path, precision="int8")
    (ir,) = (cache_dir / "openvino").glob("*.int8.xml")
    assert any(
        op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
        for op in ov.Core().read_model(str(ir)).get_ops()
    )
    pixels = _images(7, 3, model.arch.input_size)
    conditionals = _conditionals(model, "text", 5, 0)
    reference = OnnxImageBackend(graph).logits(pixels, conditionals)
    quantised = int8.logits(pixels, conditionals)
    threshold = np.median(reference)
    assert _iou(reference > threshold, quantised > threshold) >= 0.9
    assert not np.allclose(reference, quantised, rtol=0, atol=1e-6)  # really reduced
    # Made once: a second backend reads the IR; a damaged IR is made again.
    made = ir.stat().st_mtime_ns
    again = OpenVinoImageBackend(path, precision="int8")
    assert ir.stat().st_mtime_ns == made
    np.testing.assert_array_equal(again.logits(pixels, conditionals), quantised)
    ir.with_suffix(".bin").write_bytes(b"damaged")
    repaired = OpenVinoImageBackend(path, precision="int8")
    np.testing.assert_array_equal(repaired.logits(pixels, conditionals), quantised)
    # An in-memory graph is compressed in memory, alike.
    in_memory = OpenVinoImageBackend(graph, precision="int8")
    np.testing.assert_array_equal(in_memory.logits(pixels, conditionals), quantised)


def test_openvino_int8_says_while_it_compresses_the_weights(tiny, cache_dir, tmp_path):
    """The IR is made once (~9 s for the full-size model): said while it is, with a guess of
    how long; silent once made; said on every run where it lives in memory."""
    from clipseg_cli.run.backend import ModelOpener
    from clipseg_cli.run.config import SegmentConfig

    model, graph = tiny("rd64-refined")
    path = tmp_path / "graph.onnx"
    path.write_bytes(graph)
    said: list[str] = []
    config = SegmentConfig(inputs=("x.png",), out_dir=tmp_path / "out", prompts=("a dog",))
    opener = ModelOpener(config, "ab" * 32, model.arch, "the tiny model", on_progress=said.append)
    opener._open_openvino(path, "int8", None)
    assert len(said) == 2, said
    assert said[0].startswith(
        "compressing the image graph of the tiny model to int8 weights for OpenVINO (once, ~"
    )
    assert said[1].startswith("compressed and compiled the int8 graph of the tiny model in ")
    said.clear()
    opener._open_openvino(path, "int8", None)  # the IR is made: nothing to say
    opener._open_openvino(path, "fp32", None)
    assert said == []
    opener._open_openvino(graph, "int8", None)  # an in-memory graph: compressed every run
    assert len(said) == 2 and "(on every run: the cache cannot keep it, ~" in said[0], said


def _openvino_runs_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 here at all: natively (AVX512_BF16, AMX) or
    emulated (AVX-512 without them); on AVX2 alone it keeps f32."""
    from openvino import opset13

    x = opset13.parameter([2, 2], np.float32)
    tiny_model = ov.Model([opset13.relu(x)], [x])
    compiled = ov.Core().compile_model(tiny_model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    return compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16


@pytest.mark.skipif(not _openvino_runs_bf16(), reason="OpenVINO runs no bf16 on this CPU")
def test_openvino_bf16_is_another_precision_whose_masks_agree(tiny, monkeypatch):
    model, graph = tiny("rd64-refined")
    if not native_bf16():
        # Emulated bf16 rounds the products' inputs to bf16 as native bf16 does, only slower:
        # the backend refuses it in runs for its speed, not for its numbers.
        monkeypatch.setattr(openvino_backend, "native_bf16", lambda: True)
    pixels = _images(8, 3, model.arch.input_size)
    conditionals = _conditionals(model, "text", 3, 1)
    reference = OnnxImageBackend(graph).logits(pixels, conditionals)
    bf16 = OpenVinoImageBackend(graph, precision="bf16").logits(pixels, conditionals)
    assert not np.allclose(bf16, reference, rtol=0, atol=1e-6)  # really reduced precision
    threshold = np.median(reference)
    assert _iou(reference > threshold, bf16 > threshold) >= 0.95


def test_openvino_bf16_is_refused_without_native_bf16(tiny, monkeypatch):
    from clipseg_cli.backends import machine

    _, graph = tiny("rd64-refined")
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(ValueError, match="needs a CPU with native bf16"):
        OpenVinoImageBackend(graph, precision="bf16")


def test_openvino_keeps_compiled_blobs_in_the_cache(tiny, cache_dir, tmp_path):
    model, graph = tiny("rd64-refined")
    path = tmp_path / "graph.onnx"
    path.write_bytes(graph)
    first = OpenVinoImageBackend(path)
    blobs = list((cache_dir / "openvino").glob("*.blob"))
    assert len(blobs) == 1  # compiled once and kept
    again = OpenVinoImageBackend(path)
    assert list((cache_dir / "openvino").glob("*.blob")) == blobs
    pixels = _images(3, 1, model.arch.input_size)
    conditionals = _conditionals(model, "text", 2, 0)
    np.testing.assert_array_equal(
        first.logits(pixels, conditionals), again.logits(pixels, conditionals)
    )
    assert OpenVinoImageBackend(graph).path is None  # bytes: compiled, not cached


def _resident_in(folder: Path) -> int:
    """Bytes of this process's read-only shared mappings of files in ``folder`` in memory."""
    prefix, resident, mapped = str(folder.resolve()), 0, False
    with Path("/proc/self/smaps").open(encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
                mapped = len(fields) >= 6 and fields[1] == "r--s" and fields[5].startswith(prefix)
            elif mapped and fields[0] == "Rss:":
                resident += int(fields[1]) * 1024
    return resident


def test_openvino_hands_back_the_mapped_blob_once_the_weights_are_repacked(
    tiny, cache_dir, tmp_path
):
    """On Linux the blob's mapped pages leave memory at the first inference; elsewhere (no
    /proc maps, no madvise through libc) nothing is touched and the logits are the same."""
    model, graph = tiny("rd64-refined")
    path = tmp_path / "graph.onnx"
    path.write_bytes(graph)
    OpenVinoImageBackend(path)  # compiles and writes the blob
    backend = OpenVinoImageBackend(path)  # maps the blob
    blobs = cache_dir / "openvino"
    linux = sys.platform.startswith("linux")
    if linux:
        assert _resident_in(blobs) > 0
    pixels = _images(2, 1, model.arch.input_size)
    conditionals = _conditionals(model, "text", 2, 0)
    first = backend.logits(pixels, conditionals)
    if linux:
        assert _resident_in(blobs) == 0
    else:
        assert openvino_backend.release_mapped_blobs(blobs) == 0
    np.testing.assert_array_equal(backend.logits(pixels, conditionals), first)


def test_openvino_refuses_what_is_not_an_image_graph(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph at all")
    with pytest.raises(BackendError, match=r"OpenVINO cannot compile .*broken\.onnx"):
        OpenVinoImageBackend(broken)


# ---------------------------------------------------------------------------------------------
# The graph cache
# ---------------------------------------------------------------------------------------------


def test_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPSEG_CACHE", str(tmp_path / "here"))
    assert cache.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("CLIPSEG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "clipseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    if sys.platform.startswith("linux"):
        assert cache.cache_dir() == Path.home() / ".cache" / "clipseg"


def test_graph_key_changes_with_everything_it_depends_on(tiny, monkeypatch):
    arch = tiny("rd64-refined")[0].arch
    base = cache.graph_key(SHA, arch, "fp32")
    assert base == cache.graph_key(SHA, arch, "fp32")
    assert len(base) == 64
    others = {
        "weights": cache.graph_key("cd" * 32, arch, "fp32"),
        "variant": cache.graph_key(SHA, arch, "int8"),
        "input size": cache.graph_key(SHA, replace(arch, input_size=arch.input_size + 16), "fp32"),
        "decoder": cache.graph_key(
            SHA, replace(arch, decoder=replace(arch.decoder, reduce_dim=16)), "fp32"
        ),
        "extract layers": cache.graph_key(
            SHA, replace(arch, decoder=replace(arch.decoder, extract_layers=(2, 5, 8))), "fp32"
        ),
    }
    monkeypatch.setattr(cache, "OPSET", cache.OPSET + 1)
    others["opset"] = cache.graph_key(SHA, arch, "fp32")
    monkeypatch.undo()
    monkeypatch.setattr(cache, "ort_version", lambda: "0.0.1-other")
    others["onnxruntime"] = cache.graph_key(SHA, arch, "fp32")
    monkeypatch.undo()
    int8 = others["variant"]
    monkeypatch.setitem(cache.INT8_SETTINGS, "per_channel", not cache.INT8_SETTINGS["per_channel"])
    others["int8 settings"] = cache.graph_key(SHA, arch, "int8")
    assert cache.graph_key(SHA, arch, "fp32") == base  # fp32 does not depend on them
    monkeypatch.undo()
    assert cache.graph_key(SHA, arch, "int8") == int8
    assert len(set(others.values()) | {base}) == len(others) + 1, others
    with pytest.raises(ValueError, match="variant"):
        cache.graph_key(SHA, arch, "fp16")
    with pytest.raises(ValueError, match="sha256"):
        cache.graph_key("../../etc", arch, "fp32")


def test_graph_is_exported_once_then_loaded_from_the_cache(cache_dir, fake_export):
    model, graph, calls = fake_export
    arch = model.arch
    messages: list[str] = []
    assert cache.cached_graph(SHA, arch, "fp32") is None
    first = open_onnx_backend(SHA, arch, lambda: model, label="tiny", on_progress=messages.append)
    assert len(calls) == 1 and first.built == ("export",)
    assert first.path is not None and first.path.read_bytes() == graph
    assert first.path.parent == cache_dir / "graphs"
    assert cache.cached_graph(SHA, arch, "fp32") == first.path
    assert cache.cached_graph(SHA, arch, "int8") is None
    assert messages[0].startswith("exporting the image graph of tiny for the CPU runtimes (once, ~")
    assert messages[0].endswith(" s on this machine)")
    assert messages[1].startswith("exported the image graph of tiny in ")
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["size"] == len(graph) and sidecar["variant"] == "fp32"

    messages.clear()
    second = open_onnx_backend(SHA, arch, _no_model, on_progress=messages.append)
    assert second.built == () and second.path == first.path and not messages
    assert len(calls) == 1
    pixels = _images(3, 1, arch.input_size)
    conditionals = _conditionals(model, "text", 2, 0)
    _assert_same(
        second.backend.logits(pixels, conditionals),
        TorchImageBackend(model).logits(pixels, conditionals),
    )
    assert not [p for p in (cache_dir / "graphs").iterdir() if ".tmp-" in p.name]


def test_an_untouched_graph_is_trusted_without_hashing_it_again(cache_dir, monkeypatch):
    """A warm run does not read the whole graph to hash it (0.8 s for 290 MB) while its size
    and modification time are those recorded when it was written; once touched, it is hashed
    (and, intact, trusted again)."""
    key = cache.graph_key(SHA, TINY, "fp32")
    path = cache.store_graph(key, b"graph bytes" * 100, {})
    hashed: list[Path] = []
    real_hash = cache.sha256_file

    def counting_hash(target: Path) -> str:
        hashed.append(target)
        return real_hash(target)

    monkeypatch.setattr(cache, "sha256_file", counting_hash)
    assert cache.verify_graph(key) == (path, None) and hashed == []
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    assert cache.verify_graph(key) == (path, None) and hashed == [path]
    assert cache.verify_graph(key) == (path, None) and hashed == [path]  # remembered
    path.write_bytes(b"graph bytez" * 100)  # same size, other bytes, new time
    assert (
        cache.verify_graph(key)[1] == "its sha256 differs from the one recorded when it was written"
    )


def _damage(how: str, path: Path) -> None:
    sidecar = path.with_suffix(".json")
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":  # same size: only the hash can tell
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "no sidecar":
        sidecar.unlink()
    elif how == "garbage sidecar":
        sidecar.write_text("{not json")
    elif how == "no graph":
        path.unlink()
    elif how == "not a graph, sidecar matching":  # intact bytes that ONNX Runtime refuses
        key = path.stem
        cache.store_graph(key, b"\x08\x07garbage" * 100, {})
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "flipped byte",
        "empty",
        "no sidecar",
        "garbage sidecar",
        "no graph",
        "not a graph, sidecar matching",
    ],
)
def test_a_damaged_cached_graph_is_rebuilt(cache_dir, fake_export, how):
    model, graph, calls = fake_export
    arch = model.arch
    path = open_onnx_backend(SHA, arch, lambda: model).path
    _damage(how, path)
    messages: list[str] = []
    rebuilt = open_onnx_backend(SHA, arch, lambda: model, on_progress=messages.append)
    assert rebuilt.built == ("export",) and len(calls) == 2
    assert any("rebuilding" in message for message in messages), messages
    assert path.read_bytes() == graph
    assert cache.verify_graph(path.stem) == (path, None)
    pixels = _images(4, 1, arch.input_size)
    conditionals = _conditionals(model, "text", 1, 0)
    _assert_same(
        rebuilt.backend.logits(pixels, conditionals),
        TorchImageBackend(model).logits(pixels, conditionals),
    )


def test_int8_is_built_from_the_cached_fp32_graph_without_the_model(cache_dir, fake_export):
    model, _, calls = fake_export
    arch = model.arch
    open_onnx_backend(SHA, arch, lambda: model)
    messages: list[str] = []
    int8 = open_onnx_backend(SHA, arch, _no_model, variant="int8", on_progress=messages.append)
    assert int8.built == ("int8",) and len(calls) == 1
    assert messages[0].startswith("quantising the image graph of the model to int8 (once, ~")
    assert (
        int8.path == cache.cached_graph(SHA, arch, "int8") != cache.cached_graph(SHA, arch, "fp32")
    )
    again = open_onnx_backend(SHA, arch, _no_model, variant="int8")
    assert again.built == () and again.backend.variant == "int8"


def _make_cache_unwritable(folder: Path, monkeypatch) -> None:
    """chmod the cache read-only; where that does not stop us (root), writes raise EROFS."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return
    probe.unlink()

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    for name in ("write_bytes_atomic", "write_json_atomic", "atomic_write"):
        monkeypatch.setattr(cache, name, refuse)


def test_a_read_only_cache_keeps_the_graph_in_memory_with_a_warning(
    cache_dir, fake_export, monkeypatch
):
    model, _, calls = fake_export
    arch = model.arch
    _make_cache_unwritable(cache_dir, monkeypatch)
    try:
        for variant in ("fp32", "int8"):
            loaded = open_onnx_backend(SHA, arch, lambda: model, variant=variant, label="tiny")
            assert loaded.path is None and loaded.backend.path is None
            assert len(loaded.warnings) == 1
            (warning,) = loaded.warnings
            assert "\n" not in warning and "not writable" in warning
            assert "kept in memory" in warning and "tiny" in warning
            pixels = _images(5, 1, arch.input_size)
            conditionals = _conditionals(model, "text", 1, 0)
            logits = loaded.backend.logits(pixels, conditionals)
            assert logits.shape == (1, 1, arch.input_size, arch.input_size)
        assert len(calls) == 2  # exported again for int8: nothing could be kept
        assert not list(cache_dir.rglob("*.onnx"))
        stored = cache.store_text_embeddings(SHA, ["a dog"], np.ones((1, 4), np.float32))
        assert stored is not None and "not writable" in stored
    finally:
        cache_dir.chmod(0o755)


_CONCURRENT = textwrap.dedent(
    """
    import json, sys, time, types
    from pathlib import Path
    import numpy as np

    graph_file, me, other, sha, arch_repr = sys.argv[1:6]
    me, other = Path(me), Path(other)

    def timed_export(model):
        # This process's export: its own (valid, differently serialised) graph. Both processes
        # then store theirs at the same moment, slowly, in pieces.
        data = Path(graph_file).read_bytes()
        me.touch()
        deadline = time.monotonic() + 60
        while not other.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return data, 0.01

    # Stands in for the torch exporter (the parity tests run the real one), so that both
    # processes reach the cache at once within a second, without torch.
    sys.modules["clipseg_cli.backends.export"] = types.SimpleNamespace(timed_export=timed_export)
    import clipseg_cli.backends.cache as cache
    from clipseg_cli.backends.onnx import open_onnx_backend
    from clipseg_cli.io.files import sha256_file
    from clipseg_cli.specs import ArchitectureSpec, DecoderSpec, TextSpec, VisionSpec

    class SlowFile:
        # A file whose large writes go in pieces, with pauses between them.

        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            view = memoryview(data)
            if len(view) < 1 << 16:
                return self.handle.write(view)
            step = len(view) // 8 + 1
            for start in range(0, len(view), step):
                self.handle.write(view[start:start + step])
                self.handle.flush()
                time.sleep(0.05)
            return len(view)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    real_open = Path.open

    def slow_open(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return SlowFile(handle) if "w" in mode and ".onnx" in self.name else handle

    Path.open = slow_open  # how the cache writes stays the cache's own code
    arch = eval(arch_repr)
    loaded = open_onnx_backend(sha, arch, lambda: "model")
    rng = np.random.default_rng(0)
    size = arch.input_size
    pixels = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    cond = rng.standard_normal((2, arch.embed_dim)).astype(np.float32)
    logits = loaded.backend.logits(pixels, cond)
    print(json.dumps({"built": loaded.built, "path": str(loaded.path),
                      "logits": logits.ravel()[::97].tolist(),
                      "graph_sha256": sha256_file(loaded.path),
                      "torch": "torch" in sys.modules}))
    """
)


def test_two_processes_exporting_at_once_both_end_with_a_valid_graph(tiny, tmp_path, monkeypatch):
    model, graph = tiny("rd16")
    # Two valid graphs of one model that differ in bytes and size (as exports of differently
    # loaded models do): interleaved or mismatched writes would leave a broken file or pair.
    other = onnx.load_from_string(graph)
    other.doc_string = "the other process's export " * 1000
    graphs = [tmp_path / "graph-0.onnx", tmp_path / "graph-1.onnx"]
    graphs[0].write_bytes(graph)
    graphs[1].write_bytes(other.SerializeToString())
    env = {**os.environ, "CLIPSEG_CACHE": str(tmp_path / "cache")}
    script = tmp_path / "export_one.py"
    script.write_text(_CONCURRENT)
    flags = [tmp_path / "ready-0", tmp_path / "ready-1"]
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(graphs[i]),
                str(flags[i]),
                str(flags[1 - i]),
                SHA,
                repr(model.arch),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in (0, 1)
    ]
    results = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout))
    assert all(flag.exists() for flag in flags)  # both reached the cache
    assert [r["built"] for r in results] == [["export"], ["export"]]
    assert not any(r["torch"] for r in results)
    assert results[0]["path"] == results[1]["path"]
    np.testing.assert_allclose(results[0]["logits"], results[1]["logits"], rtol=1e-6)
    path = Path(results[0]["path"])
    assert path.parent == tmp_path / "cache" / "graphs"
    monkeypatch.setenv("CLIPSEG_CACHE", str(tmp_path / "cache"))
    assert cache.verify_graph(path.stem) == (path, None)
    assert path.read_bytes() in (graphs[0].read_bytes(), graphs[1].read_bytes())  # not a mix
    whole = {sha256_file(graphs[0]), sha256_file(graphs[1])}
    assert {r["graph_sha256"] for r in results} <= whole  # each loaded one complete graph
    assert OnnxImageBackend(path).input_size == model.arch.input_size
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("flock", ["as the platform has it", "absent (as on Windows)"])
def test_a_reader_never_trusts_a_graph_without_its_own_sidecar(cache_dir, monkeypatch, flock):
    """A writer replacing a graph holds the key's lock until its sidecar is written too, so a
    reader waits for the pair; where there is no ``fcntl`` the reader does not wait, but the new
    graph against the old sidecar fails the check and is reported, never trusted."""
    if flock.startswith("absent"):
        monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    try:
        import fcntl  # noqa: F401 - only whether it imports
    except ImportError:
        locks = False
    else:
        locks = True
    key = "ef" * 32
    cache.store_graph(key, b"old graph" * 1000)
    graph_renamed, finish = threading.Event(), threading.Event()
    real_write_json = cache.write_json_atomic

    def write_json_slowly(path, obj):
        graph_renamed.set()  # the new graph is in place, its sidecar not yet
        finish.wait(5)
        real_write_json(path, obj)

    monkeypatch.setattr(cache, "write_json_atomic", write_json_slowly)
    writer = threading.Thread(target=cache.store_graph, args=(key, b"new graph" * 999))
    writer.start()
    assert graph_renamed.wait(5)
    seen: list = []
    reader = threading.Thread(target=lambda: seen.append(cache.verify_graph(key)))
    reader.start()
    reader.join(0.3)
    if locks:
        assert reader.is_alive()  # waiting for the writer's lock
    else:
        assert not reader.is_alive()
        path, reason = seen.pop()
        assert path is None and "bytes where" in reason  # new graph, old sidecar: rejected
    finish.set()
    writer.join(5)
    reader.join(5)
    path, reason = seen[0] if seen else cache.verify_graph(key)
    assert reason is None and path.read_bytes() == b"new graph" * 999


# ---------------------------------------------------------------------------------------------
# Text-embedding cache
# ---------------------------------------------------------------------------------------------


def test_text_embeddings_round_trip_by_weights_and_exact_prompt(cache_dir):
    prompts = ["a dog", "a cat", "ünïcode ✓"]
    vectors = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    assert cache.load_text_embeddings(SHA, prompts) is None
    assert cache.store_text_embeddings(SHA, prompts, vectors) is None
    np.testing.assert_array_equal(cache.load_text_embeddings(SHA, prompts), vectors)
    np.testing.assert_array_equal(cache.load_text_embeddings(SHA, prompts[::-1]), vectors[::-1])
    assert cache.load_text_embeddings("cd" * 32, prompts) is None  # other weights
    assert cache.load_text_embeddings(SHA, ["a dog "]) is None  # not the exact text
    assert cache.load_text_embeddings(SHA, ["a dog", "a bird"]) is None  # one missing
    assert cache.load_text_embeddings(SHA, []) is None
    files = sorted((cache_dir / "text" / SHA).iterdir())
    assert len(files) == 3
    files[0].write_bytes(files[0].read_bytes()[:40])  # truncated: a miss, not an error
    assert cache.load_text_embeddings(SHA, prompts) is None
    with pytest.raises(ValueError):
        cache.store_text_embeddings(SHA, prompts, vectors[:2])
    with pytest.raises(ValueError):
        cache.store_text_embeddings(SHA, ["x"], np.full((1, 4), np.nan, np.float32))


# ---------------------------------------------------------------------------------------------
# No torch on the ONNX side
# ---------------------------------------------------------------------------------------------


def test_the_onnx_side_runs_without_importing_torch(tiny, cache_dir, fake_export):
    model, _, _ = fake_export
    arch = model.arch
    cached = open_onnx_backend(SHA, arch, lambda: model).path
    cache.store_text_embeddings(SHA, ["a dog"], np.ones((1, arch.embed_dim), np.float32))
    script = textwrap.dedent(
        f"""
        import sys
        import clipseg_cli.backends.cache as cache
        light = {{"torch", "numpy", "onnxruntime"}} & set(sys.modules)
        assert not light, f"the cache module imported {{light}}"
        from clipseg_cli.backends.onnx import OnnxImageBackend, open_onnx_backend
        from clipseg_cli.specs import ArchitectureSpec, DecoderSpec, TextSpec, VisionSpec
        import numpy as np
        arch = {arch!r}
        assert cache.cached_graph({SHA!r}, arch, "fp32") is not None
        def no_model():
            raise AssertionError("no export expected")
        loaded = open_onnx_backend({SHA!r}, arch, no_model)
        assert loaded.built == () and str(loaded.path) == {str(cached)!r}
        size = arch.input_size
        out = loaded.backend.logits(np.zeros((2, size, size, 3), np.uint8),
                                    cache.load_text_embeddings({SHA!r}, ["a dog"]))
        assert out.shape == (2, 1, size, size)
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    env = {**os.environ, "CLIPSEG_CACHE": str(cache_dir)}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok"


def test_a_graph_that_cannot_load_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(BackendError, match="cannot load") as raised:
        OnnxImageBackend(bad)
    assert "\n" not in str(raised.value)
