"""moekit.MoE with MoE++'s zero-computation experts against a naive per-token loop (float64)."""

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit import MoE
from moekit.routers import TopK

D, F_, E = 6, 8, 3


def _layer(zero=1, copy=1, constant=2, router="moepp", seed=0, **kw):
    torch.manual_seed(seed)
    return MoE(D, F_, E, router=router, zero_experts=zero, copy_experts=copy, constant_experts=constant, **kw).double()


def naive_moepp(moe, x_TD):
    """Per token: softmax over all experts of ``W x`` (in fp32, as moekit's routers), top-k, then ``sum_j w_j E_j(x)`` with each
    expert written out: FFN (SwiGLU), zero, copy or constant (``a1 x + a2 v``, ``a = softmax(W_c x)``)."""
    ex, zc, gate = moe.experts, moe.zc_experts, moe.gate
    rows = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        p = torch.softmax(gate.weight.float() @ x.float(), dim=0).double()
        chosen = sorted(range(p.numel()), key=lambda e: -float(p[e].detach()))[: gate.k]
        y = x * 0
        for e in chosen:
            if e < E:
                g, u = (ex.first_proj[e] @ x).chunk(2)
                out = ex.down_proj[e] @ (F.silu(g) * u)
            elif e < E + zc.num_zero:
                out = x * 0
            elif e < E + zc.num_zero + zc.num_copy:
                out = x
            else:
                c = e - E - zc.num_zero - zc.num_copy
                a = torch.softmax(zc.constant_gate[c] @ x, dim=0)
                out = a[0] * x + a[1] * zc.constant[c]
            y = y + p[e] * out
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("kinds", [(1, 1, 2), (2, 0, 0), (0, 2, 0), (0, 0, 3), (1, 1, 1)])
def test_zero_computation_experts_match_the_naive_loop_in_outputs_and_gradients(kinds):
    moe = _layer(*kinds)
    with torch.no_grad():  # a router that picks every kind of expert
        moe.gate.weight.mul_(8)
    x = torch.randn(24, D, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    chosen = torch.cat([moe.last_routing.expert, moe.last_zc_routing.expert + E]).unique()
    assert len(chosen) >= E + sum(kinds) - 1  # nearly every expert is exercised
    y_ref = naive_moepp(moe, x)
    tol = {"rtol": 1e-5, "atol": 1e-6}  # the routing weights are fp32 (a matmul vs a mat-vec: rounding)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    params = [x, *moe.parameters()]
    got = torch.autograd.grad(y, params, g, allow_unused=True)
    want = torch.autograd.grad(y_ref, params, g, allow_unused=True)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for name, a, b in zip(names, got, want):
        if a is None or b is None:  # only the unused gating residual (no previous layer)
            assert name == "gate.residual_weight" and (a is None or not a.any()) and (b is None or not b.any())
            continue
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_gradcheck_on_a_tiny_layer():
    moe = _layer(1, 1, 1, seed=3)
    moe.gate.weight.data.mul_(6)
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    r = moe.gate(x.detach())  # a fixed routing: gradcheck's finite differences must not flip the top-k
    zc = moe.zc_experts

    def f(x, w, cg, v):  # cg, v are the layer's own constant-expert parameters, perturbed in place
        return moe(x, routing=moekit.Routing(r.token, r.expert, w, r.num_tokens, r.num_experts))

    assert torch.autograd.gradcheck(f, (x, r.weight.detach().double().requires_grad_(), zc.constant_gate, zc.constant))


def test_with_all_counts_zero_the_layer_is_todays():
    torch.manual_seed(0)
    plain = MoE(D, F_, E, router=TopK(k=2))
    torch.manual_seed(0)
    zero = MoE(D, F_, E, router=TopK(k=2), zero_experts=0, copy_experts=0, constant_experts=0)
    assert zero.zc_experts is None and zero.num_zc_experts == 0
    sd, sd0 = plain.state_dict(), zero.state_dict()
    assert list(sd) == list(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd)
    x = torch.randn(16, D)
    assert torch.equal(plain(x), zero(x))
    assert zero.last_zc_routing is None and str(plain) == str(zero)


def test_never_chosen_zero_computation_experts_leave_the_output_as_without_them():
    """Router rows of -inf-like logits: softmax gives them 0, so the FFN routing is the plain one (up to the
    rounding of a router matmul of another shape)."""
    torch.manual_seed(1)
    plain = MoE(D, F_, E, router=TopK(k=2, balance=0.0, z_loss=0.0))
    zc = MoE(D, F_, E, router=TopK(k=2, balance=0.0, z_loss=0.0), zero_experts=1, copy_experts=1, constant_experts=1)
    zc.experts.load_state_dict(plain.experts.state_dict())
    with torch.no_grad():
        zc.gate.weight.zero_()
        zc.gate.weight[:E] = plain.gate.weight
    x = torch.randn(12, D) + 3.0
    with torch.no_grad():
        zc.gate.weight[E:] = -1e4 * x.mean(0) / x.mean(0).square().sum()  # logit -1e4 on the mean input
    y0, y1 = plain(x), zc(x)
    assert zc.last_zc_routing.num_assignments == 0
    assert torch.equal(plain.last_routing.expert, zc.last_routing.expert)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)


def test_routing_stats_count_ffn_and_all_experts_per_token():
    moe = _layer(1, 1, 2)
    x = torch.randn(20, D, dtype=torch.float64)
    r = moe.gate(x)
    moe(x, routing=r)
    st = moekit.routing_stats(moe)[""]
    ffn = r.expert < E
    assert st.mean_experts_per_token == pytest.approx(int(ffn.sum()) / 20)
    assert st.mean_all_experts_per_token == pytest.approx(2.0)
    assert st.tokens_per_expert == [int((r.expert == e).sum()) for e in range(E)]
    assert st.zc_tokens_per_expert == [int((r.expert == E + j).sum()) for j in range(4)]
    assert moe.last_routing.num_experts == E and moe.last_zc_routing.num_experts == 4


def test_bad_counts_and_routings_are_one_line_errors():
    with pytest.raises(ValueError, match="zero_experts"):
        MoE(D, F_, E, zero_experts=-1)
    with pytest.raises(TypeError, match="copy_experts"):
        MoE(D, F_, E, copy_experts=1.5)
    moe = _layer(1, 0, 0)
    x = torch.randn(3, D, dtype=torch.float64)
    bad = moekit.Routing.from_topk(torch.tensor([[E + 1]] * 3), torch.ones(3, 1), E + 2)
    with pytest.raises(ValueError, match="num_experts=5 but the layer has 4"):
        moe(x, routing=bad)


def test_compiled_layer_equals_eager_in_outputs_and_gradients():
    """The split of the routing is the one data-dependent size (a graph break); the rest traces."""
    torch._dynamo.reset()
    moe = _layer(1, 1, 2).float().train()
    compiled = torch.compile(moe, backend="aot_eager")
    x = torch.randn(12, D)
    outs = []
    for m in (moe, compiled):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        loss = y.square().sum() + moekit.aux_loss(moe)
        outs.append((y.detach(), torch.autograd.grad(loss, [xi, *moe.parameters()], allow_unused=True)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[1][1], outs[0][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
