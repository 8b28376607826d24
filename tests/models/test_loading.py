"""moekit.models.loading: a saved GPT loaded with its experts never materialised: the swap sees them on the
meta device, every other tensor is the saved one, the tied embedding stays tied; a corrupt checkpoint or a
missing tensor is refused."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.io import IntegrityError
from moekit.layer import MoE
from moekit.models import GPT, GPTConfig
from moekit.models.gpt import WEIGHTS_FILE
from moekit.models.loading import load_without_experts

CFG = GPTConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, d_ff=32).with_moe(4, 2)


class Zero(torch.nn.Module):
    """Experts that output zeros (a stand-in for experts served from elsewhere)."""

    def forward(self, x, seg):
        return torch.zeros_like(x)


def _swap(seen):
    def swap(model, manifest):
        seen["manifest"] = manifest
        for m in model.modules():
            if isinstance(m, MoE):
                seen.setdefault("meta", []).append(m.experts.down_proj.is_meta)
                m.experts = Zero()

    return swap


def test_every_other_tensor_is_the_saved_one(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    model.save(tmp_path / "m")
    seen = {}
    loaded = load_without_experts(tmp_path / "m", _swap(seen))
    assert seen["meta"] == [True, True] and WEIGHTS_FILE in seen["manifest"]["files"]
    assert not loaded.training and loaded.head.weight is loaded.embed.weight
    saved = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == {k for k in saved if ".experts." not in k}
    for k, v in got.items():
        assert torch.equal(v, saved[k]), k


def test_a_tensor_missing_from_the_file_or_a_corrupt_file_is_refused(tmp_path):
    torch.manual_seed(0)
    GPT(CFG).save(tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    state = load_file(str(weights))
    del state["norm.weight"]
    save_file(state, str(weights))  # the checksum no longer matches
    with pytest.raises(IntegrityError):
        load_without_experts(tmp_path / "m", _swap({}))


def test_a_tensor_the_file_lacks(tmp_path, monkeypatch):
    torch.manual_seed(0)
    GPT(CFG).save(tmp_path / "m")
    monkeypatch.setattr("moekit.models.loading.verify_model", lambda path: {"files": {}})
    weights = tmp_path / "m" / WEIGHTS_FILE
    state = load_file(str(weights))
    del state["norm.weight"]
    save_file(state, str(weights))
    monkeypatch.setattr("moekit.models.loading.read_config", lambda path: CFG)
    with pytest.raises(ValueError, match="no tensor 'norm.weight'"):
        load_without_experts(tmp_path / "m", _swap({}))
