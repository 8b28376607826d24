import pytest
import torch

from moekit import FFN, Routing
from moekit.convert import moe_from_ffn, partition_ffn
from moekit.convert.partition import partition_gpt
from moekit.models import GPT, GPTConfig


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("E", [1, 2, 8])
def test_all_experts_on_equals_the_dense_ffn(activation, E):
    torch.manual_seed(0)
    ffn = FFN(16, 32, activation).double()
    moe = moe_from_ffn(ffn, E, "softmax").double()
    x = torch.randn(7, 16, dtype=torch.float64)
    every = Routing(torch.arange(7).repeat_interleave(E), torch.arange(E).repeat(7), torch.ones(7 * E, dtype=torch.float64), 7, E)
    assert (moe(x, routing=every) - ffn(x)).abs().max() <= 1e-12


def test_partition_errors():
    with pytest.raises(ValueError, match=r"num_experts=5 does not divide d_ff=32; valid counts: \[1, 2, 4, 8, 16, 32\]"):
        partition_ffn(FFN(16, 32), 5)
    with pytest.raises(TypeError, match="expected a moekit FFN"):
        partition_ffn(torch.nn.Linear(2, 2), 2)


def test_partition_gpt_copies_everything_and_cuts_every_ffn():
    torch.manual_seed(0)
    dense = GPT(GPTConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, d_ff=32)).eval()
    moe = partition_gpt(dense, 4, "sigmoid_ste").eval()
    assert moe.config.layer_ffn(0)["d_ff"] == 8 and moe.config.layer_ffn(1)["router"] == "sigmoid_ste"
    d_state, m_state = dense.state_dict(), moe.state_dict()
    for k, v in d_state.items():
        if ".ffn." not in k:
            assert torch.equal(m_state[k], v), k
    x = torch.randn(5, 16)
    every = Routing(torch.arange(5).repeat_interleave(4), torch.arange(4).repeat(5), torch.ones(20), 5, 4)
    for db, mb in zip(dense.blocks, moe.blocks):
        torch.testing.assert_close(mb.ffn(x, routing=every), db.ffn(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="num_experts=3 does not divide d_ff=32"):
        partition_gpt(dense, 3, "topk")
