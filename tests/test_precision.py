"""Reduced precision: the MoE layer with every router, and the GPT, under ``torch.autocast`` (bf16,
fp16) and with bf16/fp16 weights. Routers compute in fp32 in both cases, so the routing equals the
fp32 routing exactly; the experts' outputs and gradients are compared with fp32 within the stated
tolerances (bf16 carries 8 bits of mantissa, fp16 11). Tiny shapes: reduced precision is slow on CPU."""

import copy

import pytest
import torch

import moekit
from moekit.models import GPT, GPTConfig
from moekit.routers import available_routers, router_class

# moekit's routers (not those other test modules register), but pregate, which routes by a PreGate's ids
ROUTERS = [r for r in available_routers() if router_class(r).__module__.startswith("moekit.") and r != "pregate"]
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _layer(router):
    torch.manual_seed(0)
    moe = moekit.MoE(16, 32, 4, router=router)
    x = torch.randn(10, 16)
    ctx = {"importance": torch.rand(10) + 0.1} if router == "dynamic_k" else {}
    return moe, x, ctx


def _same_routing(a, b):
    assert torch.equal(a.token, b.token) and torch.equal(a.expert, b.expert)
    torch.testing.assert_close(a.weight.float(), b.weight.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("router", ROUTERS)
def test_moe_under_autocast_routes_in_fp32_and_stays_close(router, dtype):
    moe, x, ctx = _layer(router)
    moe.eval()
    x_ref = x.clone().requires_grad_()
    y_ref = moe(x_ref, **ctx)
    y_ref.square().sum().backward()
    r_ref = moe.last_routing
    x_low = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y = moe(x_low, **ctx)
    _same_routing(moe.last_routing, r_ref)
    y.float().square().sum().backward()
    tol = TOL[dtype]
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x_low.grad, x_ref.grad, rtol=2 * tol, atol=2 * tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("router", ROUTERS)
def test_moe_with_low_precision_weights(router, dtype):
    moe, x, ctx = _layer(router)
    low = copy.deepcopy(moe).to(dtype).eval()
    ref = copy.deepcopy(low).float().eval()  # the same rounded weights, computed in fp32
    x_low = x.to(dtype)
    y = low(x_low, **ctx)
    y_ref = ref(x_low.float(), **ctx)
    assert y.dtype == dtype
    _same_routing(low.last_routing, ref.last_routing)
    torch.testing.assert_close(y.float(), y_ref, rtol=TOL[dtype], atol=TOL[dtype])


KINDS = {
    "moe": ({"kind": "moe", "num_experts": 4, "d_ff": 32, "router_args": {"k": 2}}, None),
    "mole": ({"kind": "mole", "num_experts": 2, "d_ff": 32}, None),
    "pregated": ({"kind": "pregated", "num_experts": 4, "d_ff": 32}, {"num_experts": 4, "d_model": 16, "n_heads": 2}),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(KINDS))
def test_gpt_trains_and_generates_under_autocast(kind, dtype):
    torch.manual_seed(0)
    spec, pregate = KINDS[kind]
    model = GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, ffn=[spec] * 2, pregate=pregate))
    ids = torch.randint(0, 64, (2, 12))
    ref = model.loss(ids[:, :-1], ids[:, 1:])
    with torch.autocast("cpu", dtype=dtype):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        out = model.generate(ids[:1, :4], 4)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=TOL[dtype])
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert out.shape == (1, 8)
