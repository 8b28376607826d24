"""The GPT's FFN-kind registry: built-in kinds, a kind registered in a test, unknown kinds."""

import pytest
import torch
from torch import nn

from moekit import FFN, MoE
from moekit.models import GPT, GPTConfig, available_ffns, register_ffn
from moekit.models.mole import MoLE
from moekit.routers import PreGated

SMALL = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, d_ff=32)


def test_built_in_kinds_build_their_modules():
    assert {"dense", "moe", "pregated", "mole"} <= set(available_ffns())
    specs = [{"kind": "dense"}, {"kind": "moe", "num_experts": 4, "d_ff": 8, "router_args": {"k": 2}},
             {"kind": "mole", "num_experts": 2, "d_ff": 8}, {"kind": "pregated", "num_experts": 4, "d_ff": 8}]
    model = GPT(GPTConfig(**{**SMALL, "n_layers": 4}, ffn=specs, pregate={"num_experts": 4, "d_model": 8,
                                                                          "n_heads": 2}))
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [FFN, MoE, MoLE, MoE] and isinstance(model.blocks[3].ffn.gate, PreGated)
    assert model.blocks[1].ffn.experts.d_ff == 8 and model.blocks[0].ffn.up_proj.out_features == 32
    ids = torch.randint(0, 64, (2, 5))
    assert model(ids).shape == (2, 5, 64)


def test_a_kind_registered_in_one_place_is_built_by_name():
    class Scaled(nn.Module):
        def __init__(self, d, scale):
            super().__init__()
            self.proj, self.scale = nn.Linear(d, d), scale

        def forward(self, x):
            return self.scale * self.proj(x)

    @register_ffn("test-scaled")
    def scaled(cfg, spec):
        return Scaled(cfg.d_model, spec.get("scale", 1.0))

    model = GPT(GPTConfig(**SMALL, ffn=[{"kind": "test-scaled", "scale": 3.0}, {"kind": "dense"}]))
    assert isinstance(model.blocks[0].ffn, Scaled) and model.blocks[0].ffn.scale == 3.0
    assert "test-scaled" in available_ffns()
    with pytest.raises(ValueError, match="already registered"):
        register_ffn("test-scaled")(lambda cfg, spec: None)


def test_unknown_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown kind 'nope'; valid kinds are \[.*'dense'.*'mole'"):
        GPT(GPTConfig(**SMALL, ffn=[{"kind": "nope"}] * 2))
    with pytest.raises(ValueError, match="routed by the PreGate"):
        GPT(GPTConfig(**SMALL, ffn=[{"kind": "pregated", "router": "topk"}] * 2, pregate={"num_experts": 8}))
