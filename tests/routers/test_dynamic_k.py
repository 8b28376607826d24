"""DynamicK, DA-MoE's rule (moekit/routers/dynamic_k.py; our design, papers.md §5.2)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit
from moekit import MoE
from moekit.routers import DynamicK

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


def test_k_rule_hand_computed():
    """K_t = clamp(ceil(k_max * importance_t / scale), k_min, k_max), here with k_max / scale = 2."""
    router = DynamicK(k_min=2, k_max=6).bind(4, 8).eval()
    router.scale.fill_(3.0)
    importance = torch.tensor([0.0, 0.4, 0.5, 1.2, 2.0, 2.6, 3.0, 9.0])
    # 2 * importance = 0, 0.8, 1.0, 2.4, 4.0, 5.2, 6.0, 18 -> ceil 0, 1, 1, 3, 4, 6, 6, 18 -> clamp [2, 6]
    assert router.experts_per_token(importance).tolist() == [2, 2, 2, 3, 4, 6, 6, 6]
    r = router(torch.randn(8, 4), importance=importance)
    assert r.k_per_token.tolist() == [2, 2, 2, 3, 4, 6, 6, 6] and r.num_assignments == 31
    assert router.scale.item() == 3.0  # eval: the running scale never moves


def test_top_k_t_softmax_weights_hand_computed():
    """Logits = x (identity router); each token's top-K_t experts, weights = softmax over those K_t."""
    router = DynamicK(1, 4).bind(4, 4).eval()
    router.scale.fill_(1.0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    ln = math.log
    x = torch.tensor([
        [2.0, 0.0, 1.0, -1.0],          # K=1: expert 0, weight 1
        [ln(2), ln(6), 0.0, -3.0],      # K=2: experts 1, 0 -> 6/8, 2/8
        [0.0, ln(2), ln(5), -9.0],      # K=3: experts 2, 1, 0 -> 5/8, 2/8, 1/8
        [ln(4), ln(3), ln(2), 0.0],     # K=4: experts 0..3 -> 0.4, 0.3, 0.2, 0.1
    ])
    r = router(x, importance=torch.tensor([0.25, 0.5, 0.75, 1.0]))  # K = ceil(4 * importance) = 1, 2, 3, 4
    assert r.token.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert r.expert.tolist() == [0, 1, 0, 2, 1, 0, 0, 1, 2, 3]
    want = torch.tensor([1.0, 0.75, 0.25, 0.625, 0.25, 0.125, 0.4, 0.3, 0.2, 0.1])
    torch.testing.assert_close(r.weight, want, atol=1e-6, rtol=0)


def test_running_max_scale_update_hand_computed():
    """Default: the first training batch calibrates scale = its max importance, then
    scale <- (1 - m) * scale + m * max(importance); K uses the scale from before the update."""
    router = DynamicK(1, 4, momentum=0.25).bind(4, 4)
    r = router(torch.randn(3, 4), importance=torch.tensor([0.5, 2.0, 1.0]))
    assert r.k_per_token.tolist() == [1, 4, 2]  # ceil(4 * [0.25, 1, 0.5])
    assert router.scale.item() == 2.0
    r = router(torch.randn(3, 4), importance=torch.tensor([1.0, 6.0, 0.2]))
    assert r.k_per_token.tolist() == [2, 4, 1]  # ceil(4 * [1, 6, 0.2] / 2) = 2, 12, 1 -> clamp
    assert router.scale.item() == pytest.approx(0.75 * 2.0 + 0.25 * 6.0)  # 3.0
    router(torch.randn(2, 4), importance=torch.tensor([1.0, 0.5]))
    assert router.scale.item() == pytest.approx(0.75 * 3.0 + 0.25 * 1.0)  # 2.5
    router.eval()
    router(torch.randn(2, 4), importance=torch.tensor([100.0, 0.5]))
    assert router.scale.item() == pytest.approx(2.5)


def test_budget_controller_update_hand_computed():
    """budget=b: start at mean(importance) * k_max / b, then scale <- scale * (mean K / b) ** m (log-space,
    multiplicative: a mean K twice the budget and then half of it bring the scale back)."""
    router = DynamicK(1, 4, budget=2.0, momentum=0.5).bind(4, 4)
    r = router(torch.randn(4, 4), importance=torch.tensor([0.5, 1.0, 1.5, 1.0]))
    assert r.k_per_token.tolist() == [2, 3, 4, 3]  # first batch: its own max (1.5) as scale
    assert router.scale.item() == pytest.approx(1.0 * 4 / 2.0)  # mean importance 1.0
    r = router(torch.randn(4, 4), importance=torch.full((4,), 2.0))
    assert r.k_per_token.tolist() == [4, 4, 4, 4]  # mean K 4 = 2 x budget
    assert router.scale.item() == pytest.approx(2.0 * 2.0**0.5)
    r = router(torch.randn(4, 4), importance=torch.full((4,), 0.1))
    assert r.k_per_token.tolist() == [1, 1, 1, 1]  # mean K 1 = budget / 2
    assert router.scale.item() == pytest.approx(2.0)


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
