"""Routing statistics of calibration data against a hand count."""

import pytest
import torch

from moekit.compress import (
    gather_stats,
)
from tests.compress.fixed import Fixed


def test_gather_stats_counts_tokens_and_gate_mass_of_every_batch():
    model = Fixed([0, 2, 2, 0, 2], [0.5, 1.0, 0.25, 0.0, 2.0])
    stats = gather_stats(model, [torch.randn(5, 4), torch.randn(5, 4)])
    st = stats["moe"]
    # per batch: expert 0 gets one token with a non-zero weight (0.5), expert 2 three (1 + 0.25 + 2)
    assert st.tokens.tolist() == [2, 0, 6]
    assert st.gate.tolist() == pytest.approx([1.0, 0.0, 6.5])
    assert st.num_tokens == 10
    assert model.training  # the mode is restored
