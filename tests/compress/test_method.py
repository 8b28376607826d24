"""The expert-compression slot: statistics gathered against a hand count, a method registered in a
test is found by name and applied to every MoE layer."""

import pytest
import torch
from torch import nn

from moekit import MoE, Routing
from moekit.compress import (
    CompressionMethod,
    ExpertStats,
    available_compressions,
    build_compression,
    compress,
    gather_stats,
    register_compression,
)


class Fixed(nn.Module):
    """A model of one MoE layer whose routing is given: token t goes to ``experts[t]`` with ``weights[t]``."""

    def __init__(self, experts, weights):
        super().__init__()
        self.moe = MoE(4, 8, 3, router="topk")
        self.experts, self.weights = torch.tensor(experts), torch.tensor(weights)

    def forward(self, x):
        T = x.shape[0]
        r = Routing(token=torch.arange(T), expert=self.experts, weight=self.weights, num_tokens=T, num_experts=3)
        return self.moe(x, routing=r)


def test_gather_stats_counts_tokens_and_gate_mass_of_every_batch():
    model = Fixed([0, 2, 2, 0, 2], [0.5, 1.0, 0.25, 0.0, 2.0])
    stats = gather_stats(model, [torch.randn(5, 4), torch.randn(5, 4)])
    st = stats["moe"]
    # per batch: expert 0 gets one token with a non-zero weight (0.5), expert 2 three (1 + 0.25 + 2)
    assert st.tokens.tolist() == [2, 0, 6]
    assert st.gate.tolist() == pytest.approx([1.0, 0.0, 6.5])
    assert st.num_tokens == 10
    assert model.training  # the mode is restored


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
