"""The conversion driver (moekit/convert/driver.py): a converted copy, the input model untouched."""

import torch

from moekit import FFN
from moekit.convert import partition, prune, upcycle
from tests.convert.models import _gpt, _gpt_calibration


def test_conversions_leave_the_input_model_untouched():
    dense = _gpt()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    partition(dense, 4)
    upcycle(dense, 2)
    prune(dense, 0.5, calibration=_gpt_calibration())
    after = dense.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(b.ffn, FFN) for b in dense.blocks)
