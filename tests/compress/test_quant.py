"""Group-wise quantization: codes packed bit for bit, exact bytes, round-trip error within half a step."""

import math

import pytest
import torch

from moekit.compress.quant import BITS, dequantize, pack_bits, quantize, quantized_bytes, unpack_bits


def _pack_loop(codes, bits):
    """Reference packing: code i's bit k is stream bit i*bits + k; stream bit s is bit s % 8 of byte s // 8."""
    out = [0] * math.ceil(len(codes) * bits / 8)
    for i, c in enumerate(codes):
        for k in range(bits):
            s = i * bits + k
            out[s // 8] |= ((c >> k) & 1) << (s % 8)
    return out


@pytest.mark.parametrize("bits", BITS)
def test_packing_matches_a_bit_loop_and_unpacks(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == _pack_loop(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


def test_three_bit_codes_by_hand():
    # codes 5 (101), 3 (011), 7 (111): stream LSB first 1,0,1, 1,1,0, 1,1,1 -> byte0 = 0b11011101, byte1 = 1
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 1]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_round_trip_is_within_half_a_step(bits):
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(1)) * 0.1
    q = quantize(w, bits, group=32)
    grp = w.reshape(6, 4, 32)
    step = (grp.amax(-1) - grp.amin(-1)) / (2 ** bits - 1)
    err = (dequantize(q) - w).abs().reshape(6, 4, 32).amax(-1)
    # half a step, plus the fp16 rounding of the zero (2^-11 |min|) and of the scale (2^-11 per step, x 2^b - 1)
    slack = 2 ** -10 * (grp.abs().amax(-1) + (grp.amax(-1) - grp.amin(-1)))
    assert bool((err <= step / 2 + slack).all())
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16 and tuple(q.scale.shape) == (6, 4)
    # the group's extremes are reproduced to fp16 precision
    deq = dequantize(q).reshape(6, 4, 32)
    assert torch.allclose(deq.amin(-1), grp.amin(-1), atol=1e-3) and torch.allclose(deq.amax(-1), grp.amax(-1), atol=1e-3)


def test_more_bits_means_less_error():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    errs = [float((dequantize(quantize(w, b)) - w).norm()) for b in BITS]
    assert errs == sorted(errs, reverse=True)


def test_one_bit_is_sign_times_mean_magnitude():
    w = torch.tensor([[0.5, -1.0, 0.0, 2.0, -0.25, 0.75, -3.0, 1.0]])
    q = quantize(w, 1, group=4)
    assert q.zero is None
    s0, s1 = (0.5 + 1.0 + 0.0 + 2.0) / 4, (0.25 + 0.75 + 3.0 + 1.0) / 4
    want = torch.tensor([[s0, -s0, s0, s0, -s1, s1, -s1, s1]])  # sign(0) counts as +1
    assert torch.allclose(dequantize(q), want, atol=1e-3)
    assert q.codes.tolist() == [0b10101101]  # (sign + 1) / 2, LSB first


@pytest.mark.parametrize("bits,group,want", [
    (3, 64, 8 * 128 * 3 // 8 + 16 * 4),  # 384 code bytes, 16 groups x (scale + zero)
    (1, 64, 8 * 128 // 8 + 16 * 2),  # 1 bit: scale only
    (2, 32, 8 * 128 * 2 // 8 + 32 * 4),
    (8, 128, 8 * 128 + 8 * 4),
])
def test_bytes_count_codes_scales_and_zeros(bits, group, want):
    assert quantized_bytes((8, 128), bits, group) == want
    assert quantize(torch.randn(8, 128), bits, group).nbytes == want


def test_bytes_round_up_a_partial_last_byte():
    assert quantized_bytes((1, 3), 3, group=3) == 2 + 4  # 9 bits -> 2 bytes
    assert quantize(torch.randn(1, 3), 3, group=3).nbytes == 6


def test_leading_dims_are_kept():
    w = torch.randn(3, 4, 64)
    assert dequantize(quantize(w, 4, 16)).shape == (3, 4, 64)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(torch.randn(2, 64), 5)
    with pytest.raises(ValueError, match="multiple of group=64"):
        quantize(torch.randn(2, 48), 2)
    with pytest.raises(ValueError, match="group must be a positive integer"):
        quantized_bytes((2, 64), 2, 0)
