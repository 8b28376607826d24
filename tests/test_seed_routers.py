"""DSelect-k, SigmoidSTE (DSMoE) and DynamicK (DA-MoE): exact oracles from papers.md §1.6 and §4.5."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit
from moekit import MoE
from moekit.multitask import MultiGateMoE
from moekit.routers import DSelectK, DynamicK, SigmoidSTE, TopK
from moekit.routers.dselect import binary_codes, selector_outputs, smooth_step

from .reference import reference_moe

# ----------------------------------------------------------------------------------- DSelect-k


def test_smooth_step_values_and_derivative():
    t = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5, 0.7, -3.0], dtype=torch.float64, requires_grad=True)
    s = smooth_step(t, 1.0)
    torch.testing.assert_close(s.detach(), torch.tensor([0.5, 0.84375, 0.15625, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    (g,) = torch.autograd.grad(s.sum(), t)
    assert g[0] == pytest.approx(1.5) and g[3] == 0 and g[4] == 0 and g[5] == 0 and g[6] == 0
    # gamma scales the band: S(gamma/4; gamma) = S(1/4; 1)
    assert float(smooth_step(torch.tensor(0.5), 2.0)) == pytest.approx(0.84375)


def test_binary_codes_msb_first():
    assert binary_codes(4).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert binary_codes(5).tolist()[4] == [1, 0, 0]
    assert binary_codes(1).shape == (1, 0)


def test_one_hot_selection_from_saturated_logits():
    r = selector_outputs(torch.tensor([[[0.5, -0.5]]]), binary_codes(4), 1.0)
    assert r.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]  # code "10" = expert 2
    r0 = selector_outputs(torch.zeros(1, 1, 2), binary_codes(4), 1.0)
    assert r0.flatten().tolist() == [0.25, 0.25, 0.25, 0.25]


@given(z=st.lists(st.floats(-2, 2), min_size=3, max_size=3), m_experts=st.sampled_from([2, 4, 8]))
def test_selection_sums_to_one_for_powers_of_two(z, m_experts):
    m = int(math.log2(m_experts))
    r = selector_outputs(torch.tensor(z[:m], dtype=torch.float64).view(1, 1, m), binary_codes(m_experts).double(), 1.0)
    assert float(r.sum()) == pytest.approx(1.0)


def test_unreachable_penalty_for_non_power_of_two():
    router = DSelectK(2, per_example=False).bind(8, 5)
    r = router(torch.randn(3, 8))
    assert float(r.losses["unreachable"].detach()) >= 2 * 3  # k selectors x T tokens, each >= 1
    with torch.no_grad():  # all mass on reachable codes (first bit 0): the penalty is exactly k * T
        router.z_logits[..., 0] = -1.0
    assert float(router(torch.randn(3, 8)).losses["unreachable"].detach()) == pytest.approx(6.0)
    assert "unreachable" not in DSelectK(2).bind(8, 4)(torch.randn(3, 8)).losses


@pytest.mark.parametrize("per_example", [True, False])
def test_saturated_gate_has_at_most_k_experts_and_zero_selector_gradient(per_example):
    torch.manual_seed(0)
    router = DSelectK(2, per_example=per_example).bind(8, 8)
    with torch.no_grad():
        if per_example:
            router.z_proj.weight.zero_()
            router.z_proj.bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0]))  # codes 101 and 011
        else:
            router.z_logits.copy_(torch.tensor([[[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]]))
    moe = MoE(8, 8, 8, router=router)
    x = torch.randn(6, 8)
    y = moe(x)
    r = moe.last_routing
    assert set(r.expert.tolist()) == {5, 3} and r.num_assignments == 12  # only the k chosen experts run
    torch.testing.assert_close(y, reference_moe(moe, x, routing=r)[0])
    y.sum().backward()
    z_grad = router.z_proj.bias.grad if per_example else router.z_logits.grad
    assert torch.all(z_grad == 0)
    w_grad = router.w_proj.weight.grad if per_example else router.w_logits.grad
    assert w_grad.abs().sum() > 0  # the selector mixture still learns


def test_dselect_layer_matches_reference_in_the_smooth_band():
    torch.manual_seed(0)
    moe = MoE(8, 8, 6, router=DSelectK(3)).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert moe.last_routing.num_assignments == 5 * 6  # smooth band: every expert has weight
    y_ref, _ = reference_moe(moe, x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    a = torch.autograd.grad(y, [x, *moe.parameters()], g)
    b = torch.autograd.grad(reference_moe(moe, x)[0], [x, *moe.parameters()], g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_static_gate_per_task_and_bad_task_id():
    router = DSelectK(2, per_example=False, num_tasks=3).bind(8, 4)
    x = torch.randn(4, 8)
    r0, r2 = router(x, task=0), router(x, task=2)
    assert not torch.equal(r0.weight, r2.weight)
    assert torch.equal(r0.weight.view(4, -1)[0], r0.weight.view(4, -1)[3])  # no input dependence
    router(x, task=torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\), got \[3\]"):
        router(x, task=3)


def test_dselect_bad_arguments():
    with pytest.raises(ValueError, match="k=5 must be <= num_experts=4"):
        MoE(8, 8, 4, router=DSelectK(5))
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, inf\], got 0"):
        DSelectK(2, gamma=0)
    with pytest.raises(ValueError, match="num_tasks is for the static form"):
        DSelectK(2, num_tasks=2)


def test_entropy_regulariser_only_in_training():
    router = DSelectK(2, entropy=0.5).bind(8, 4)
    r = router(torch.randn(3, 8))
    q = router.gate(torch.randn(3, 8))[0]
    assert float(r.losses["entropy"].detach()) > 0 and q.shape == (3, 2, 4)
    router.eval()
    assert router(torch.randn(3, 8)).losses == {}


# ----------------------------------------------------------------------------------- SigmoidSTE (DSMoE)


def _gated(tau=0.5, **kw):
    torch.manual_seed(0)
    moe = MoE(8, 8, 4, router=SigmoidSTE(tau=tau, **kw))
    with torch.no_grad():
        moe.gate.weight.zero_()
    return moe


def test_ste_pattern_gate_below_tau_learns_its_expert_does_not():
    moe = _gated()
    x = torch.randn(5, 8)
    x[:, 0] = 1.0
    with torch.no_grad():  # experts 0, 1 active (q = sigmoid(3) > 0.5); experts 2, 3 inactive (sigmoid(-3))
        moe.gate.weight[:, 0] = torch.tensor([3.0, 3.0, -3.0, -3.0]) * 1.0
        moe.gate.weight[:, 1:] = 0
    y = moe(x)
    (y.square().sum()).backward()
    gw = moe.gate.weight.grad
    assert gw[2].abs().sum() > 0 and gw[3].abs().sum() > 0  # inactive gates still get a gradient
    for e in (2, 3):
        assert torch.all(moe.experts.gate_up_proj.grad[e] == 0) and torch.all(moe.experts.down_proj.grad[e] == 0)
    for e in (0, 1):
        assert moe.experts.down_proj.grad[e].abs().sum() > 0


def test_no_ste_ablation_gives_inactive_gates_no_gradient():
    moe = _gated(ste=False)
    x = torch.randn(5, 8)
    x[:, 0] = 1.0
    with torch.no_grad():
        moe.gate.weight[:, 0] = torch.tensor([3.0, 3.0, -3.0, -3.0])
        moe.gate.weight[:, 1:] = 0
    moe(x).square().sum().backward()
    assert torch.all(moe.gate.weight.grad[2:] == 0)


def test_rescale_n_over_active_and_inference_computes_active_only():
    moe = _gated(sparsity=0.0)
    x = torch.randn(5, 8)
    x[:, 0] = 1.0
    with torch.no_grad():
        moe.gate.weight[:, 0] = torch.tensor([3.0, -3.0, -3.0, -3.0])
        moe.gate.weight[:, 1:] = 0
    moe.eval()
    y = moe(x)
    r = moe.last_routing
    assert r.expert.unique().tolist() == [0] and r.num_assignments == 5  # only the active expert runs
    q = torch.sigmoid(torch.tensor(3.0))
    torch.testing.assert_close(r.weight, torch.full((5,), float(q * 4 / 1)))  # n / #active = 4
    torch.testing.assert_close(y, reference_moe(moe, x, routing=r)[0])
    moe.train()
    torch.testing.assert_close(moe(x), y, atol=1e-6, rtol=1e-6)  # training computes all, same value


def test_no_active_gate_gives_zero_output_not_nan():
    moe = _gated()
    with torch.no_grad():
        moe.gate.weight.fill_(0)
    x = torch.zeros(3, 8)  # q = 0.5 exactly: not > tau
    for mode in (True, False):
        moe.train(mode)
        y = moe(x + 0.0)
        assert torch.all(torch.isfinite(y)) and torch.all(y == 0)


def test_sparsity_loss_is_mean_of_hard_gates():
    moe = _gated(sparsity=2.0)
    x = torch.randn(6, 8)
    moe(x)
    q = torch.sigmoid(moe.last_routing.logits)
    torch.testing.assert_close(moe.last_routing.losses["sparsity"], 2.0 * (q * (q > 0.5)).mean())


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, 1.5])
def test_tau_outside_unit_interval(tau):
    with pytest.raises(ValueError, match="tau must lie in"):
        SigmoidSTE(tau=tau)


# ----------------------------------------------------------------------------------- DynamicK (DA-MoE)


@given(imp=st.lists(st.floats(0, 10), min_size=1, max_size=30), k_min=st.integers(1, 3), extra=st.integers(0, 3))
def test_k_within_range_and_non_decreasing_in_importance(imp, k_min, extra):
    router = DynamicK(k_min=k_min, k_max=k_min + extra).bind(8, 8)
    importance = torch.tensor(imp)
    k = router.experts_per_token(importance)
    assert int(k.min()) >= k_min and int(k.max()) <= k_min + extra
    order = torch.argsort(importance)
    assert torch.all(k[order][1:] >= k[order][:-1])


def test_dynamic_k_routing_uses_top_k_t_softmax():
    torch.manual_seed(0)
    router = DynamicK(1, 4).bind(8, 6).eval()
    router.scale.fill_(1.0)
    x = torch.randn(4, 8)
    importance = torch.tensor([0.1, 0.3, 0.6, 1.0])  # K = ceil(4 * imp) = 1, 2, 3, 4
    r = router(x, importance=importance)
    assert r.experts_per_token().tolist() == [1, 2, 3, 4]
    for t in range(4):
        sel = r.token == t
        top = torch.topk(r.logits[t], int(sel.sum()))
        assert r.expert[sel].tolist() == top.indices.tolist()
        torch.testing.assert_close(r.weight[sel], torch.softmax(top.values, -1))


def test_budget_controller_keeps_mean_k():
    torch.manual_seed(0)
    router = DynamicK(1, 4, budget=2.0, momentum=0.2).bind(8, 8)
    for _ in range(200):
        router(torch.randn(64, 8), importance=torch.rand(64) ** 2)
    router.eval()
    r = router(torch.randn(4096, 8), importance=torch.rand(4096) ** 2)
    assert abs(r.num_assignments / 4096 - 2.0) < 0.15


def test_dynamic_k_needs_importance_and_works_in_gpt():
    router = DynamicK(1, 2).bind(8, 4)
    with pytest.raises(ValueError, match="needs the tokens' importance"):
        router(torch.randn(3, 8))
    from moekit.models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, d_ff=32)
    model = GPT(cfg.with_moe(4, 2, router="dynamic_k", router_args={"k_min": 1, "k_max": 3}))
    ids = torch.randint(0, 50, (2, 10))
    loss = model.loss(ids, ids) + moekit.aux_loss(model)
    loss.backward()
    k = model.blocks[0].ffn.last_routing.k_per_token
    assert k.shape == (20,) and int(k.min()) >= 1 and int(k.max()) <= 3


@pytest.mark.parametrize("budget", [None, 2.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_dynamic_k_refuses_non_finite_importance_and_keeps_its_scale(bad, budget):
    import copy

    torch.manual_seed(0)
    router = DynamicK(1, 4, budget=budget).bind(8, 6)  # training mode: calls update the running scale
    router(torch.randn(5, 8), importance=torch.rand(5))  # calibrated
    scale = router.scale.clone()
    assert float(scale) > 0
    twin = copy.deepcopy(router)  # never sees the bad call
    importance = torch.rand(5)
    importance[[1, 3]] = bad
    with pytest.raises(ValueError, match=r"DynamicK: importance has 2 non-finite value\(s\) \(NaN or inf\) among 5; "
                                         r"pass a finite importance"):
        router(torch.randn(5, 8), importance=importance)
    assert torch.equal(router.scale, scale)
    x, imp = torch.randn(7, 8), torch.rand(7)  # a finite call after works as if the bad one never happened
    r, want = router(x, importance=imp), twin(x, importance=imp)
    assert r.k_per_token.tolist() == want.k_per_token.tolist() and int(r.k_per_token.min()) >= 1
    assert torch.equal(r.expert, want.expert) and torch.equal(r.weight, want.weight)
    assert torch.equal(router.scale, twin.scale) and bool(torch.isfinite(router.scale))


def test_dynamic_k_running_scale_stays_finite():
    """Finite importance whose scale overflows float32 (3e38 * k_max / budget) leaves the scale as it was."""
    router = DynamicK(1, 4, budget=2.0).bind(8, 6)
    r = router(torch.randn(4, 8), importance=torch.full((4,), 3e38))
    assert float(router.scale) == 0.0  # still uncalibrated, not inf
    assert r.k_per_token.tolist() == [4, 4, 4, 4]  # K from the batch's own calibration: ceil(4 * 1) = 4
    router(torch.randn(4, 8), importance=torch.rand(4))
    assert 0 < float(router.scale) < math.inf


def test_dynamic_k_bad_arguments():
    with pytest.raises(ValueError, match="k_max must lie in"):
        DynamicK(3, 2)
    with pytest.raises(ValueError, match="k_max=5 must be <= num_experts=4"):
        MoE(8, 8, 4, router=DynamicK(1, 5))
    with pytest.raises(ValueError, match="budget must lie in"):
        DynamicK(1, 4, budget=5)


# ----------------------------------------------------------------------------------- multi-gate MoE


@pytest.mark.parametrize("gates", [["softmax", "softmax"], [TopK(2), "dselect"], [DSelectK(2, per_example=False), TopK(1)]])
def test_multigate_matches_naive(gates):
    torch.manual_seed(0)
    model = MultiGateMoE(8, 4, 8, gates, task_out=[1, 3]).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    mixtures = model.mixtures(x)
    for t, r in enumerate(model.last_routing):
        want = reference_moe_experts(model, x, r)
        torch.testing.assert_close(mixtures[t], want)
    outs = model(x)
    assert [o.shape for o in outs] == [(6, 1), (6, 3)]
    assert set(moekit.routing_stats(model)) == {"[0]", "[1]"}


def reference_moe_experts(model, x, r):
    from .reference import reference_experts

    return reference_experts(x, r, model.experts)
