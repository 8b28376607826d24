"""The expert-compression slot: a method registered in a
test is found by name and applied to every MoE layer."""

import pytest
import torch
from torch import nn

from moekit.compress import (
    CompressionMethod,
    ExpertStats,
    available_compressions,
    build_compression,
    compress,
    register_compression,
)
from moekit.compress.surgery import prune_layer
from moekit.models import GPT, GPTConfig
from tests.compress.fixed import Fixed


def test_a_registered_method_is_applied_to_every_moe_layer():
    seen = []

    @register_compression("test-replace-unused")
    class ReplaceUnused(CompressionMethod):
        def compress_layer(self, moe, stats: ExpertStats):
            seen.append((stats.tokens.tolist(), self.settings))
            return nn.Identity() if int((stats.tokens == 0).sum()) >= self.settings["unused"] else moe

    assert "test-replace-unused" in available_compressions()
    model = Fixed([0, 0, 1], [1.0, 1.0, 1.0])
    compress(model, "test-replace-unused", [torch.randn(3, 4)], unused=1)
    assert isinstance(model.moe, nn.Identity) and seen == [([2, 1, 0], {"unused": 1})]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_compression("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_compression("test-replace-unused")(type("Other", (CompressionMethod,), {}))
    with pytest.raises(NotImplementedError, match="compress_layer"):
        CompressionMethod().compress_layer(model, ExpertStats.empty(3))


def test_zero_computation_experts_are_refused_not_dropped():
    cfg = GPTConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=16, max_seq_len=16)
    model = GPT(cfg.with_moe(4, 2, zero_experts=1, copy_experts=1))
    with pytest.raises(ValueError, match="zero-computation experts"):
        compress(model, "prune-count", [torch.randint(0, 32, (2, 8))], num_experts=2)
    with pytest.raises(ValueError, match="zero-computation experts"):
        prune_layer(model.blocks[0].ffn, [0, 1])
