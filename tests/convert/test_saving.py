"""Saving and loading converted models (moekit/convert/saving.py): round trips and damaged files."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import moekit
from moekit.convert import partition, prune, upcycle
from moekit.convert.saving import CONVERT_FILE, FORMAT, load, save
from tests.convert.models import FAMILIES, _dense, _ids, _loss, _max_diff, _moes, _out, _tokenizer
from tests.faults import edit_json, flip_byte, resign


def _converted(family: str, method: str) -> nn.Module:
    dense = _dense(family)
    if method == "partition":
        return partition(dense, 4, grouping="cluster")
    if method == "upcycle":
        return upcycle(dense, 4)
    return prune(dense, 0.5)


#: what an upcycled (top-k, renormalised) Hugging Face model is saved as; every other conversion: moekit's format
NATIVE = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
          "qwen3": "Qwen3MoeForCausalLM"}


@pytest.mark.parametrize("method", ["partition", "upcycle", "prune"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, method, tmp_path):
    conv = _converted(family, method).eval()
    ids = _ids()
    with torch.no_grad():
        ref = _out(conv, ids)
    save(conv, tmp_path)
    back = load(tmp_path).eval()
    native = NATIVE.get(family) if method == "upcycle" else None
    with torch.no_grad():
        if native:  # transformers' attention around the same moekit layers: equal up to summation order
            assert type(back).__name__ == native
            torch.testing.assert_close(_out(back, ids), ref, atol=1e-5, rtol=0)
        else:
            assert type(back) is type(conv)
            assert torch.equal(_out(back, ids), ref)
            assert back.state_dict().keys() == conv.state_dict().keys()
    if family == "gpt":
        assert back.config.extra["convert"]["method"] == method
        assert back.config == conv.config
    else:
        meta = json.loads((tmp_path / CONVERT_FILE).read_text())
        assert meta["method"] == method and meta["family"] == family and len(meta["layers"]) == 2
        assert meta["format"] == FORMAT and meta.get("native") == native
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
                                         r"from its config \(llama, 2 FFNs\)"):
        load(saved_llama)


def test_load_rejects_a_config_that_does_not_match(saved_llama):
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d["config"].update(num_hidden_layers=3))
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
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d.update(format=2, family="qwen2"))
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


def test_a_format_1_folder_of_an_earlier_version_still_loads(tmp_path):
    """FORMAT 1: the base model's own config.json, no "config" in moekit_convert.json."""
    conv = partition(_dense("qwen3"), 4).eval()
    save(conv, tmp_path)
    (tmp_path / "config.json").write_text(conv.config.to_json_string())
    _edit_json(tmp_path / CONVERT_FILE, lambda d: (d.pop("config"), d.update(format=1)))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(_out(load(tmp_path), ids), _out(conv, ids))


@pytest.mark.parametrize("method", ["upcycle", "partition"])  # HF-native and moekit's format
def test_save_pretrained_writes_what_load_reads(method, tmp_path):
    conv = _converted("llama", method).eval()
    assert conv.save_pretrained(tmp_path / "a", max_shard_size="1GB", safe_serialization=True) == tmp_path / "a"
    back = load(tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        ref = _out(conv, ids)
        torch.testing.assert_close(_out(back, ids), ref, atol=1e-5, rtol=0)
        back.save_pretrained(tmp_path / "b")  # and the loaded model saves the same way
        torch.testing.assert_close(_out(load(tmp_path / "b"), ids), ref, atol=1e-5, rtol=0)
    model_type = json.loads((tmp_path / "b" / "config.json").read_text())["model_type"]
    assert model_type == ("mixtral" if method == "upcycle" else "moekit")
    assert conv.save_pretrained(tmp_path / "c", is_main_process=False) is None  # another process writes
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"push_to_hub": True}, r"push_to_hub=True is not supported for a model converted by moekit"),
    ({"state_dict": {}}, r"state_dict=\{\} is not supported"),
    ({"safe_serialization": False}, r"safe_serialization=False is not supported"),
    ({"variant": "fp16"}, r"variant='fp16' is not supported"),
    ({"max_shard_size": "1KB"}, r"max_shard_size='1KB' is smaller than the weights \([\d,]+ bytes\)"),
])
def test_save_pretrained_refuses_what_it_cannot_honour(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=rf"^save_pretrained: {message}"):
        _converted("llama", "upcycle").save_pretrained(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_save_formats_and_tokenizers(tmp_path):
    tok = _tokenizer(tmp_path / "cache")
    conv = _converted("llama", "upcycle")
    save(conv, tmp_path / "m", tokenizer=tok, format="moekit")  # maps, but moekit's format asked for
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "moekit"
    text = "alpha beta uno"
    import transformers

    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "m")(text)["input_ids"] == tok.encode(text).ids
    with pytest.raises(ValueError, match=r"export_hf: layer 0 routes with SigmoidSTE"):
        save(partition(_dense("llama"), 4), tmp_path / "n", format="hf")
    with pytest.raises(ValueError, match=r"format must be one of \['auto', 'moekit', 'hf'\], got 'onnx'"):
        save(conv, tmp_path / "o", format="onnx")
    gpt = _converted("gpt", "upcycle")
    save(gpt, tmp_path / "gpt", tokenizer=tok)  # a GPT folder carries its tokenizer.json only
    assert (tmp_path / "gpt" / "tokenizer.json").read_text() == tok.to_str()
    assert not (tmp_path / "gpt" / "tokenizer_config.json").exists()
    save(gpt, tmp_path / "gpt_hf", tokenizer=tok, format="hf")
    assert json.loads((tmp_path / "gpt_hf" / "config.json").read_text())["model_type"] == "mixtral"
