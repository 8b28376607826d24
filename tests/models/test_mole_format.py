"""MoLE table records (moekit.models.mole.format): int8 and NF4 against hand-worked values and QLoRA's
published levels; round trips."""

import numpy as np
import pytest
import torch

from moekit.models.mole import NF4_LEVELS, dequantize, quantize


def test_int8_absmax_per_row_hand_worked():
    """Row scale = absmax / 127 (stored fp16 after the codes), code = round-to-nearest(x / scale)."""
    x = torch.tensor([[[[127 / 128, -0.5, 1.4 / 128, -1.6 / 128], [-2.0, 0.5, 0.3, 0.0]]]])  # [b=1, L=1, N=2, D=4]
    # row 0: scale 1/128, x / scale = 127, -64, 1.4, -1.6; row 1: scale 2/127, x / scale = -127, 31.75, 19.05, 0
    codes = np.array([127, -64, 1, -2, -127, 32, 19, 0], dtype=np.int8)
    scales = np.array([1 / 128, 2 / 127], dtype="<f2")
    rec = quantize(x, "int8")
    assert rec.dtype == np.uint8 and rec.shape == (1, 8 + 2 * 2)
    assert rec.tobytes() == codes.tobytes() + scales.tobytes()
    y = dequantize(rec, "int8", (1, 2, 4))
    want = torch.from_numpy(codes.astype(np.float32)).view(2, 4) * torch.from_numpy(scales.astype(np.float32)).view(2, 1)
    assert torch.equal(y.view(2, 4), want)


# QLoRA's NormalFloat-4 levels as published (Dettmers et al. 2023, appendix; bitsandbytes get_4bit_type("nf4")).
NF4_QLORA = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_levels_are_qloras():
    assert torch.equal(NF4_LEVELS.float(), torch.tensor(NF4_QLORA))
    # and they are what QLoRA derives: N(0, 1) quantiles at linspace(0.9677083, 0.5), 8 positive and
    # 7 negative ones plus an exact zero, divided by the largest
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8)[:-1].double())
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(torch.tensor(NF4_QLORA, dtype=torch.float64), v / v.max(), atol=1e-7, rtol=0)


def test_nf4_codes_scales_and_nibble_order_hand_made():
    """Two blocks of 64 with different absmax (2.0 and 0.5): each value takes the code of its nearest
    published level, codes are packed two per byte with the FIRST value in the high nibble (bitsandbytes),
    then one fp16 absmax per block follows; dequantize gives exactly level * absmax."""
    levels = torch.tensor(NF4_QLORA)
    gen = torch.Generator().manual_seed(0)
    codes0 = torch.cat([torch.tensor([15, 0, 7, 1]), torch.randint(0, 16, (60,), generator=gen)])
    codes1 = torch.cat([torch.tensor([0, 15]), torch.randint(0, 16, (62,), generator=gen)])
    block0 = 2.0 * levels[codes0]  # exactly on the levels
    # block 1: 0.3 of the way to a neighbouring level (nearest is still the level itself); ±1 stay exact
    step = torch.where(torch.arange(64) % 2 == 0, 1, -1)
    nb = (codes1 + step).clamp(0, 15)
    inner = (codes1 > 0) & (codes1 < 15)
    block1 = 0.5 * torch.where(inner, levels[codes1] + 0.3 * (levels[nb] - levels[codes1]), levels[codes1])
    x = torch.cat([block0, block1]).view(1, 1, 1, 128)
    rec = quantize(x, "nf4")
    assert rec.shape == (1, 64 + 2 * 2)
    assert rec[0, 0] == 0xF0 and rec[0, 1] == 0x71  # codes 15, 0 | 7, 1: first value in the high nibble
    c = torch.cat([codes0, codes1]).numpy().astype(np.uint8)
    want = ((c[0::2] << 4) | c[1::2]).astype(np.uint8).tobytes() + np.array([2.0, 0.5], dtype="<f2").tobytes()
    assert rec.tobytes() == want
    y = dequantize(rec, "nf4", (1, 1, 128)).view(128)
    assert torch.equal(y[:64], 2.0 * levels[codes0]) and torch.equal(y[64:], 0.5 * levels[codes1])
    # the block is a parameter: block=32 stores one absmax per 32 values
    assert quantize(x, "nf4", block=32).shape == (1, 64 + 4 * 2)


@pytest.mark.parametrize("kind,rel", [("int8", 0.01), ("nf4", 0.12)])
def test_quantize_round_trip(kind, rel):
    torch.manual_seed(0)
    x = torch.randn(7, 2, 3, 128)
    y = dequantize(quantize(x, kind), kind, (2, 3, 128))
    assert float((y - x).norm() / x.norm()) < rel
    if kind == "int8":  # absmax scaling reproduces each row's largest value exactly (to fp16)
        torch.testing.assert_close(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-3, atol=0)
