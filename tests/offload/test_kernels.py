"""The expert kernels of the offload runtime against hand-worked values: one expert from its
block's parts, from a block streamed a few rows at a time, and from its int8 copy."""

import pytest
import torch

from moekit.experts import get_activation
from moekit.offload.kernels import expert_forward, int8_forward, streamed_forward
from moekit.offload.store import LayerSpec
from moekit.ops.quant import quantize_int8

RELU = get_activation("relu")
# d_model 2, d_ff 2, plain ReLU: h = first x + b1, y = down relu(h) + b2
W = {"first": torch.tensor([[1.0, 0.0], [0.0, -1.0]]), "down": torch.tensor([[1.0, 1.0], [2.0, 0.0]]),
     "first_bias": torch.tensor([0.5, 0.0]), "down_bias": torch.tensor([0.0, -1.0])}
X = torch.tensor([[3.0, 4.0], [-1.0, -2.0]])
# row 0: h = [3.5, -4] -> [3.5, 0] -> y = [3.5, 6]; row 1: h = [-0.5, 2] -> [0, 2] -> y = [2, -1]
WANT = [[3.5, 6.0], [2.0, -1.0]]


def test_expert_forward_by_hand():
    assert expert_forward(RELU, X, W).tolist() == WANT
    plain = {k: W[k] for k in ("first", "down")}
    assert expert_forward(RELU, X, plain).tolist() == [[3.0, 6.0], [2.0, 0.0]]


@pytest.mark.parametrize("rows", [1, 2])
def test_streamed_forward_equals_the_whole_block(rows):
    spec = LayerSpec(num_experts=1, d_model=2, d_ff=2, activation="relu", bias=True, first_out=2)

    def chunks():
        for r in range(0, 2, rows):
            yield "first", r, W["first"][r: r + rows]
        yield "bias", 0, torch.cat([W["first_bias"], W["down_bias"]])
        for r in range(0, 2, rows):
            yield "down", r, W["down"][r: r + rows]

    y, seconds = streamed_forward(spec, RELU, X, chunks())
    assert y.tolist() == WANT and seconds >= 0


@pytest.mark.parametrize("chunk", [1, 256])
def test_int8_forward_is_exact_for_weights_on_the_grid(chunk):
    # every row's values are multiples of absmax / 127, a power of two: the int8 copy holds them exactly
    first = torch.tensor([[127 / 64, -64 / 64], [0.0, -127 / 32]])
    down = torch.tensor([[127 / 128, 0.0], [-127 / 16, 127 / 16]])
    (q1, s1), (q2, s2) = quantize_int8(first), quantize_int8(down)
    assert torch.equal(q1.float() * s1, first) and torch.equal(q2.float() * s2, down)
    p = {"first": q1, "first_scale": s1.squeeze(-1), "down": q2, "down_scale": s2.squeeze(-1)}
    want = expert_forward(RELU, X, {"first": first, "down": down})
    torch.testing.assert_close(int8_forward(RELU, X, p, chunk=chunk), want, rtol=1e-6, atol=1e-6)

