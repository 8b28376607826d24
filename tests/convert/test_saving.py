"""Saving and loading converted models (moekit/convert/saving.py): round trips and damaged files."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import moekit
from moekit.convert import partition, prune, upcycle
from moekit.convert.saving import CONVERT_FILE, load, save
from tests.convert.models import FAMILIES, _dense, _ids, _loss, _max_diff, _moes, _out
from tests.faults import edit_json, flip_byte, resign


def _converted(family: str, method: str) -> nn.Module:
    dense = _dense(family)
    if method == "partition":
        return partition(dense, 4, grouping="cluster")
    if method == "upcycle":
        return upcycle(dense, 4)
    return prune(dense, 0.5)


@pytest.mark.parametrize("method", ["partition", "upcycle", "prune"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, method, tmp_path):
    conv = _converted(family, method).eval()
    ids = _ids()
    with torch.no_grad():
        ref = _out(conv, ids)
    save(conv, tmp_path)
    back = load(tmp_path).eval()
    assert type(back) is type(conv)
    with torch.no_grad():
        assert torch.equal(_out(back, ids), ref)
    assert back.state_dict().keys() == conv.state_dict().keys()
    if family == "gpt":
        assert back.config.extra["convert"]["method"] == method
        assert back.config == conv.config
    else:
        meta = json.loads((tmp_path / CONVERT_FILE).read_text())
        assert meta["method"] == method and meta["family"] == family and len(meta["layers"]) == 2
        assert back.moekit_convert["method"] == method
        assert back.moekit_convert["layers"] == conv.moekit_convert["layers"]


@pytest.mark.parametrize("family", ["gpt", "gpt2"])
def test_load_with_dtype_casts_the_converted_layers_too(family, tmp_path):
    conv = partition(_dense(family), 4, router="topk").eval()
    ids = _ids()
    with torch.no_grad():
        ref = _out(conv, ids)
    save(conv, tmp_path)
    back = load(tmp_path, dtype=torch.float64).eval()
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    with torch.no_grad():
        assert _max_diff(_out(back, ids).float(), ref) <= 1e-5


def test_loaded_model_keeps_training(tmp_path):
    save(partition(_dense("llama"), 4), tmp_path)
    back = load(tmp_path).train()
    loss = _loss(back, _ids()) + moekit.aux_loss(back)
    loss.backward()
    assert all(m.gate.weight.grad is not None for m in _moes(back))


@pytest.fixture
def saved_llama(tmp_path) -> Path:
    save(partition(_dense("llama"), 4), tmp_path)
    return tmp_path


def _edit_json(path: Path, edit) -> None:
    edit_json(path, edit)  # re-signed: the checks behind the checksums


def test_load_rejects_a_conversion_file_that_does_not_match(saved_llama):
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d["layers"].pop())
    with pytest.raises(ValueError, match=r"the saved conversion \(llama, 1 FFNs\) does not match the model built "
                                         r"from config.json \(llama, 2 FFNs\)"):
        load(saved_llama)


def test_load_rejects_a_config_that_does_not_match(saved_llama):
    _edit_json(saved_llama / "config.json", lambda d: d.update(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"\(llama, 2 FFNs\) does not match .* \(llama, 3 FFNs\)"):
        load(saved_llama)


def test_load_rejects_layer_specs_that_do_not_match_the_weights(saved_llama):
    def edit(d):
        d["layers"][0].update(num_experts=2, d_ff=32)

    _edit_json(saved_llama / CONVERT_FILE, edit)
    with pytest.raises(ValueError, match=r"weights do not match moekit_convert.json \(.*size mismatch"):
        load(saved_llama)


def test_load_rejects_a_foreign_format_and_family(saved_llama):
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d.update(format=99))
    with pytest.raises(ValueError, match="unsupported format 99"):
        load(saved_llama)
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d.update(format=1, family="qwen2"))
    with pytest.raises(ValueError, match=r"\(qwen2, 2 FFNs\) does not match .* \(llama, 2 FFNs\)"):
        load(saved_llama)
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d.update(family="llama", **{"class": "NoSuchModel"}))
    with pytest.raises(ValueError, match="'NoSuchModel' is not a transformers model class"):
        load(saved_llama)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "flip"])
def test_load_with_a_damaged_weights_file(family, damage, tmp_path):
    save(partition(_dense(family), 4), tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "missing":
        weights.unlink()
        with pytest.raises(ValueError, match=r"model.safetensors: missing \(listed in moekit.json\)"):
            load(tmp_path)
        return
    if damage == "flip":  # one byte in the middle of the tensors: the file still parses
        flip_byte(weights)
        with pytest.raises(ValueError, match=r"model.safetensors: checksum mismatch"):
            load(tmp_path)
        return
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"model.safetensors: [\d,]+ bytes, moekit.json records [\d,]+ \(truncated"):
        load(tmp_path)
    resign(tmp_path)  # behind the checksum, safetensors' own error still names the file
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file \(truncated or corrupt"):
        load(tmp_path)


def test_load_and_save_of_things_that_are_not_converted_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="was it written by moekit.convert.save"):
        load(tmp_path)
    with pytest.raises(ValueError, match="was not converted by moekit.convert"):
        save(_dense("llama"), tmp_path / "x")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="no moekit.json: not a model folder moekit wrote"):
        load(tmp_path)
    (tmp_path / "moekit.json").write_text(json.dumps({"format": "moekit", "version": 1, "kind": "model", "files": {
        "config.json": {"bytes": 0, "sha256": ""}}}))
    resign(tmp_path)  # a manifest that lists a config that is neither moekit's nor a converted model's
    with pytest.raises(ValueError, match="neither a moekit GPT checkpoint nor a converted Hugging Face model"):
        load(tmp_path)
