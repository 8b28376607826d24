"""Quantizers against hand-worked values (moekit.ops.quant): int8 absmax per row, NF4 codes, scales and
nibble order."""

import torch

from moekit.ops.quant import NF4_LEVELS, dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4


def test_int8_absmax_per_row_hand_worked():
    """Row 0: absmax 2.54, scale 0.02, x / scale = 127, -50, 0.4 -> 127, -50, 0; row 1: all zero keeps a
    positive scale (1e-12) and codes 0; row 2: absmax 1.27, scale 0.01, 0.005 / 0.01 = 0.5 -> 0 (half to
    even), -0.015 / 0.01 = -1.5 -> -2."""
    x = torch.tensor([[2.54, -1.0, 0.008], [0.0, 0.0, 0.0], [1.27, 0.005, -0.015]])
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 1) and scale.dtype == torch.float32
    assert q.tolist() == [[127, -50, 0], [0, 0, 0], [127, 0, -2]]
    torch.testing.assert_close(scale[:, 0], torch.tensor([0.02, 1e-12, 0.01]))
    y = dequantize_int8(q, scale)
    torch.testing.assert_close(y, torch.tensor([[2.54, -1.0, 0.0], [0.0, 0.0, 0.0], [1.27, 0.0, -0.02]]))


def test_int8_rows_of_any_rank():
    x = torch.randn(2, 3, 5)
    q, scale = quantize_int8(x)
    assert q.shape == (2, 3, 5) and scale.shape == (2, 3, 1)
    assert (q.abs().amax(-1) == 127).all()  # every row's largest magnitude takes the largest code


def test_nf4_hand_worked():
    """One record, two blocks of 4: block 0 absmax 2 holds 2, -2, 0, 1.4 (-> levels 1, -1, 0 and 0.7229...,
    codes 15, 0, 7, 14); block 1 absmax 0.5 holds 0.5, 0.04, -0.26, 0.1 (x / 0.5 = 1, 0.08, -0.52, 0.2 ->
    codes 15, 8, 2, 9). Codes are packed first value high: 0xF0, 0x7E, 0xF8, 0x29."""
    x = torch.tensor([[2.0, -2.0, 0.0, 1.4, 0.5, 0.04, -0.26, 0.1]])
    packed, scale = quantize_nf4(x, block=4)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF0, 0x7E, 0xF8, 0x29]]
    assert scale.shape == (1, 2, 1) and scale[:, :, 0].tolist() == [[2.0, 0.5]]
    y = dequantize_nf4(packed, scale)
    codes = torch.tensor([15, 0, 7, 14, 15, 8, 2, 9])
    want = NF4_LEVELS[codes] * torch.tensor([2.0] * 4 + [0.5] * 4)
    assert torch.equal(y, want.view(1, 8))
