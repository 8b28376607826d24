"""Calibration text (moekit/convert/calibration.py): its checks and error messages."""

import pytest
import torch

from moekit.convert import partition, prune
from tests.convert.models import VOCAB, _dense, _moes


def test_calibration_errors():
    dense = _dense("llama")
    with pytest.raises(ValueError, match="calibration text too small: 4 tokens, need at least 512"):
        partition(dense, 4, grouping="cluster", features="activations", calibration=torch.randint(0, VOCAB, (1, 4)))
    with pytest.raises(ValueError, match="needs calibration token ids"):
        partition(dense, 4, grouping="cluster", features="activations")
    with pytest.raises(ValueError, match=r"expected token ids \[num_sequences, seq_len\]"):
        partition(dense, 4, grouping="cluster", features="activations", calibration=torch.randn(16, 40))
    with pytest.raises(ValueError, match="calibration text too small: 40 tokens"):
        prune(dense, 0.5, calibration=torch.randint(0, VOCAB, (2, 20)))
    # a smaller minimum is honoured
    small = partition(dense, 4, grouping="cluster", features="activations",
                      calibration=torch.randint(0, VOCAB, (2, 20)), min_tokens=40)
    assert len(_moes(small)) == 2
