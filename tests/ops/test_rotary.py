"""Rotary embeddings and the KV-cache step against hand-worked values."""

import math

import pytest
import torch

from moekit.ops.rotary import Rotary, rotate_and_cache


def test_each_pair_is_rotated_by_position_times_its_frequency():
    rope = Rotary(head_dim=4, max_seq_len=8, theta=100.0)  # frequencies 1 and 100^(-2/4) = 0.1
    x = torch.tensor([[[[1.0, 0.0, 0.0, 2.0]] * 3]])  # [B=1, H=1, T=3, K=4]
    y = rope(x, offset=2)  # positions 2, 3, 4
    for t, pos in enumerate((2, 3, 4)):
        a, b = pos * 1.0, pos * 0.1
        want = [math.cos(a), math.sin(a), -2 * math.sin(b), 2 * math.cos(b)]  # (x1, x2) -> (x1 c - x2 s, x1 s + x2 c)
        assert y[0, 0, t].tolist() == pytest.approx(want, abs=1e-6)
    assert y.norm(dim=-1).allclose(x.norm(dim=-1))
    with pytest.raises(ValueError, match="longer than max_seq_len=8"):
        rope(x, offset=6)


def test_the_cache_grows_and_the_mask_is_causal_at_its_offset():
    rope = Rotary(2, 16, 10000.0)
    q, k, v = (torch.randn(1, 1, 3, 2) for _ in range(3))
    cache = {}
    _, k3, v3, mask, offset = rotate_and_cache(q, k, v, rope, cache)
    assert offset == 0 and mask.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    q2, k2, v2 = (torch.randn(1, 1, 2, 2) for _ in range(3))
    _, k5, v5, mask, offset = rotate_and_cache(q2, k2, v2, rope, cache)
    assert offset == 3 and k5.shape[-2] == 5 and torch.equal(k5[..., :3, :], k3) and torch.equal(v5[..., 3:, :], v2)
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    _, _, _, mask, offset = rotate_and_cache(q2[..., :1, :], k2[..., :1, :], v2[..., :1, :], rope, cache)
    assert mask is None and offset == 5 and cache["k"].shape[-2] == 6  # one query sees everything
