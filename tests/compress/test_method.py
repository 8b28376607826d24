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
