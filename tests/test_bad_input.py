"""Bad input raises ValueError/TypeError naming the parameter, the value and what is valid."""

import pytest
import torch

from moekit import MoE, Routing
from moekit.convert import from_hf, to_hf
from moekit.routers import ExpertChoice, TopK


def test_last_dim_mismatch():
    with pytest.raises(ValueError, match=r"d_model=8, got shape \(3, 7\)"):
        MoE(8, 8, 4)(torch.randn(3, 7))


@pytest.mark.parametrize("k,match", [(0, r"k must lie in \[1, inf\], got 0"), (5, r"k=5 must be <= num_experts=4")])
def test_k_out_of_range(k, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 8, 4, router=TopK(k))


def test_k_not_int():
    with pytest.raises(TypeError, match=r"TopK: k must be an int, got 1.5"):
        TopK(1.5)


def test_num_experts_below_one():
    with pytest.raises(ValueError, match=r"MoE: num_experts must lie in \[1, inf\], got 0"):
        MoE(8, 8, 0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_floating_input(dtype):
    with pytest.raises(TypeError, match=r"floating-point.*dtype=torch\.(int64|bool)"):
        MoE(8, 8, 4)(torch.ones(2, 8, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_and_switch_off(bad):
    x = torch.randn(4, 8)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf.*check_finite=False"):
        MoE(8, 8, 4)(x)
    MoE(8, 8, 4, check_finite=False)(x)  # the check can be switched off


def test_unknown_activation_and_router_name():
    with pytest.raises(ValueError, match=r"activation: unknown value 'tanh'; valid values are \["):
        MoE(8, 8, 4, activation="tanh")
    with pytest.raises(ValueError, match=r"router: unknown name 'top2'; valid names are \["):
        MoE(8, 8, 4, router="top2")
    with pytest.raises(TypeError, match="router: expected a moekit Router"):
        MoE(8, 8, 4, router=3)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend: unknown value 'cuda_magic'"):
        MoE(8, 8, 4, backend="cuda_magic")


def test_router_argument_ranges():
    with pytest.raises(ValueError, match="capacity_factor must lie in"):
        TopK(2, capacity_factor=0)
    with pytest.raises(ValueError, match="balance must lie in"):
        TopK(2, balance=-1)
    with pytest.raises(ValueError, match="jitter must lie in"):
        TopK(2, jitter=2)
    with pytest.raises(ValueError, match="ExpertChoice: capacity_factor must lie in"):
        ExpertChoice(-1)


def test_bad_precomputed_routing():
    moe = MoE(8, 8, 4)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="num_tokens=5 but the input has 3 tokens"):
        moe(x, routing=Routing(torch.tensor([0]), torch.tensor([0]), torch.ones(1), 5, 4))
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\), got range \[0, 7\]"):
        moe(x, routing=Routing(torch.tensor([0, 1]), torch.tensor([0, 7]), torch.ones(2), 3, 4))
    with pytest.raises(ValueError, match="num_experts=6 but the layer has 4"):
        moe(x, routing=Routing(torch.tensor([0]), torch.tensor([0]), torch.ones(1), 3, 6))


def test_unsupported_hf_block():
    with pytest.raises(TypeError, match=r"from_hf: unsupported block type torch\.nn\.modules\.linear\.Linear; supported"):
        from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="to_hf: unsupported block type"):
        to_hf(MoE(8, 8, 4), like=torch.nn.Linear(2, 2))


def test_router_used_before_binding():
    with pytest.raises(RuntimeError, match="not bound"):
        TopK(2)(torch.randn(2, 8))


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_input_dtype_differs_from_the_layer(dtype, name):
    moe = MoE(8, 8, 4)
    with pytest.raises(TypeError, match=rf"x has dtype torch\.{name} but the layer's weights are torch\.float32; "
                                        rf"cast the input with x\.to\(torch\.float32\) or the layer with "
                                        rf"moe\.to\(torch\.{name}\)"):
        moe(torch.randn(3, 8).to(dtype))


def test_input_dtype_matches_float64_layer():
    torch.manual_seed(0)
    moe = MoE(8, 8, 4).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    y = moe(x)
    assert y.dtype == torch.float64
    x32 = x.float()
    torch.testing.assert_close(y, moe.float()(x32).double(), rtol=1e-5, atol=1e-6)  # the same layer in fp32


def test_input_dtype_check_off_under_autocast():
    moe = MoE(8, 8, 4)
    x = torch.randn(3, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            moe(x)
        except TypeError as e:  # autocast does not cover every op of the experts: only our check must not raise
            assert "the layer's weights are" not in str(e)
        except RuntimeError:
            pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_routing_weight_and_switch_off(bad):
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    w = torch.full((6,), 0.5)
    w[[1, 4]] = bad
    r = Routing.from_topk(torch.tensor([[0, 1], [2, 3], [1, 2]]), w.view(3, 2), 4)
    with pytest.raises(ValueError, match=r"routing: the weights contain NaN or inf \(2 of 6\).*check_finite=False"):
        MoE(8, 8, 4)(x, routing=r)
    moe = MoE(8, 8, 4, check_finite=False)
    y = moe(x, routing=r)  # the check can be switched off: the non-finite weight reaches the output
    assert [bool(torch.isfinite(row).all()) for row in y] == [False, True, False]  # tokens 0 and 2 have one
    r.validate(3, 4)  # off by default on a bare validate
