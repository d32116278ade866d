"""Loading every weight layout strictly, and refusing bad files with one-line errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from factories import random_hf_model, save_original_checkpoint
from safetensors.torch import load_file, save_file

from clipseg_cli.weights import WeightsError, load_weights, read_state_dict


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_transformers_folder_loads_with_bin_weights_too(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / "bin")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    ours, info = load_weights(str(folder))
    reference, _ = load_weights(str(tiny_model_dir))
    assert info.files[-1].endswith("pytorch_model.bin")
    for (name, a), (_, b) in zip(
        ours.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_missing_key_is_named(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / "m")
    _rewrite_weights(folder, lambda s: s.pop("decoder.reduces.1.bias"))
    with pytest.raises(WeightsError) as error:
        load_weights(str(folder))
    assert "missing keys decoder.reduces.1.bias" in _one_line(error)


def test_unexpected_key_is_named(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / "u")
    _rewrite_weights(folder, lambda s: s.__setitem__("decoder.extra.weight", torch.ones(3)))
    with pytest.raises(WeightsError) as error:
        load_weights(str(folder))
    assert "unexpected keys decoder.extra.weight" in _one_line(error)


def test_wrong_shape_is_named(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / "s")

    def widen(state):
        state["decoder.film_add.bias"] = torch.zeros(65)

    _rewrite_weights(folder, widen)
    with pytest.raises(WeightsError) as error:
        load_weights(str(folder))
    message = _one_line(error)
    assert "wrong shapes" in message and "decoder.film_add.bias (65,)" in message


def test_variant_comes_from_the_weights_not_the_config(tmp_path):
    folder = tmp_path / "rd16"
    random_hf_model("rd16", "tiny", seed=3).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["reduce_dim"] = 64  # a config that lies about the decoder
    config["use_complex_transposed_convolution"] = True
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_weights(str(folder))
    assert model.arch.decoder.reduce_dim == 16
    assert model.arch.decoder.refined_head is False


def test_truncated_safetensors_is_a_one_line_error(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / "t")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as error:
        load_weights(str(folder))
    assert "model.safetensors" in _one_line(error)


def test_truncated_pickle_is_a_one_line_error(tiny_model_dir, tmp_path):
    path = tmp_path / "rd64-uni.pth"
    torch.save({"film_mul.weight": torch.ones(4, 4)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError) as error:
        read_state_dict(path)
    assert "not a readable PyTorch checkpoint" in _one_line(error)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "rd64-uni.pth"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(WeightsError) as error:
        load_weights(str(path), clip_weights=path)
    assert str(path) in _one_line(error)


def test_empty_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty file"):
        read_state_dict(path)


class _Payload:
    """Unpickling this runs code: the attack weights_only=True must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"film_mul.weight": _Payload(marker)}
    if container == "zip":
        torch.save(payload, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(WeightsError) as error:
        read_state_dict(path)
    assert "refused: this pickle needs arbitrary code" in _one_line(error)
    assert not marker.exists()


def test_another_models_state_dict_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.ones(8, 3, 7, 7), "fc.weight": torch.ones(10, 8)}, path)
    with pytest.raises(WeightsError) as error:
        load_weights(str(path), clip_weights=path)
    assert "not a CLIPSeg decoder" in _one_line(error)


def test_original_decoder_with_wrong_clip_is_refused(tmp_path):
    reference = random_hf_model("rd64-refined", "tiny", seed=5)
    decoder_path, clip_path = save_original_checkpoint(reference, tmp_path, "rd64-uni-refined.pth")
    clip = torch.load(clip_path, weights_only=True)
    del clip["visual.ln_post.bias"]
    torch.save(clip, clip_path)
    with pytest.raises(WeightsError) as error:
        load_weights(str(decoder_path), clip_weights=clip_path)
    assert "missing keys visual.ln_post.bias" in _one_line(error)


def test_original_decoder_safetensors_loads(tmp_path):
    reference = random_hf_model("rd16", "tiny", seed=6)
    decoder_path, clip_path = save_original_checkpoint(reference, tmp_path, "rd16-uni.pth")
    decoder_st = tmp_path / "rd16-uni.safetensors"
    save_file(torch.load(decoder_path, weights_only=True), decoder_st)
    from_pickle, _ = load_weights(str(decoder_path), clip_weights=clip_path)
    from_st, info = load_weights(str(decoder_st), clip_weights=clip_path)
    assert info.layout == "original"
    assert torch.equal(from_pickle.decoder.film_mul.weight, from_st.decoder.film_mul.weight)


def test_hub_id_not_cached_offline_explains_the_fix():
    with pytest.raises(WeightsError) as error:
        load_weights("clipseg-tests/not-a-cached-model")
    message = _one_line(error)
    assert "not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and "--model" in message


def test_original_decoder_without_clip_weights_offline_explains_the_fix(tmp_path):
    reference = random_hf_model("rd64", "tiny", seed=7)
    decoder_path, _ = save_original_checkpoint(reference, tmp_path, "rd64-uni.pth")
    with pytest.raises(WeightsError) as error:
        load_weights(str(decoder_path))
    assert "--clip-weights" in _one_line(error)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(WeightsError) as error:
        load_weights("no such thing!")
    assert "rd64-refined" in _one_line(error)


def test_clip_weights_only_with_an_original_decoder(tiny_model_dir):
    with pytest.raises(WeightsError, match="--clip-weights"):
        load_weights(str(tiny_model_dir), clip_weights="x.pt")


def test_other_model_type_is_refused(tiny_model_dir, tmp_path):
    folder = _copy_model(tiny_model_dir, tmp_path / "bert")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="not clipseg"):
        load_weights(str(folder))


def test_bf16_loading_casts_every_parameter(tiny_model_dir):
    model, _ = load_weights(str(tiny_model_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_save_transformers_dir_round_trips_through_both_loaders(tiny_model_dir, tmp_path):
    from transformers import CLIPSegForImageSegmentation

    from clipseg_cli.weights import save_transformers_dir

    model, _ = load_weights(str(tiny_model_dir))
    saved = save_transformers_dir(model, tmp_path / "saved")
    again, _ = load_weights(str(saved))
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    reference = CLIPSegForImageSegmentation.from_pretrained(tiny_model_dir).eval()
    exported = CLIPSegForImageSegmentation.from_pretrained(saved).eval()
    for (name, a), (_, b) in zip(
        reference.state_dict().items(), exported.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
