"""Routers against naive implementations and the loss formulas."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit import MoE, load_balancing_loss, router_z_loss
from moekit.routers import ExpertChoice, TopK, available_routers, build_router, register_router
from moekit.routers.topk import drop_over_capacity
from tests.reference import reference_moe, reference_topk


@given(
    T=st.integers(0, 30),
    E=st.integers(1, 10),
    k_frac=st.floats(0, 1),
    renorm=st.booleans(),
    capacity=st.one_of(st.none(), st.floats(0.1, 2.5)),
    seed=st.integers(0, 2**16),
)
def test_topk_matches_naive(T, E, k_frac, renorm, capacity, seed):
    torch.manual_seed(seed)
    k = 1 + int(k_frac * (E - 1))
    router = TopK(k, renormalize=renorm, capacity_factor=capacity).bind(6, E).double()
    x = torch.randn(T, 6, dtype=torch.float64)
    r = router(x)
    want, dropped = reference_topk(r.logits, k, renorm, capacity)
    got = list(zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist()))
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in want]
    for (_, _, a), (_, _, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    assert r.dropped == dropped
    assert r.requested == T * k


def test_topk_logits_are_fp32_even_for_low_precision_input():
    router = TopK(2).bind(8, 4)
    r = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert r.logits.dtype == torch.float32 and r.weight.dtype == torch.float32


def test_renormalize_false_keeps_softmax_values():
    router = TopK(2, renormalize=False).bind(8, 4)
    x = torch.randn(5, 8)
    r = router(x)
    probs = torch.softmax(r.logits, -1)
    torch.testing.assert_close(r.weight, probs.gather(1, r.expert.view(5, 2)).reshape(-1))


def test_capacity_drops_in_token_order():
    # all 8 tokens want expert 0; capacity = ceil(0.5 * 8 * 1 / 4) = 1 keeps token 0 only
    router = TopK(1, capacity_factor=0.5).bind(4, 4)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 10.0
    x = torch.zeros(8, 4)
    x[:, 0] = 1.0
    r = router(x)
    assert r.token.tolist() == [0] and r.expert.tolist() == [0] and r.dropped == 7


def test_drop_over_capacity_is_stable_per_expert():
    from moekit import Routing

    r = Routing(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 0, 1, 0, 1, 0]), torch.ones(6), 3, 2)
    kept = drop_over_capacity(r, 2)
    assert kept.token.tolist() == [0, 0, 1, 1] and kept.dropped == 2


def test_load_balancing_loss_formula():
    T, E, k = 64, 4, 2
    logits = torch.randn(T, E)
    probs = torch.softmax(logits, -1)
    expert = torch.topk(probs, k).indices.reshape(-1)
    f = torch.bincount(expert, minlength=E).float() / (T * k)
    want = E * (f * probs.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, expert, T * k), want)
    # perfectly balanced assignments with uniform probabilities give exactly 1
    uniform = torch.full((T, E), 1.0 / E)
    balanced = torch.arange(T * k) % E
    assert float(load_balancing_loss(uniform, balanced, T * k)) == pytest.approx(1.0)


def test_z_loss_formula():
    logits = torch.randn(10, 5)
    torch.testing.assert_close(router_z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())


def test_losses_are_scaled_by_coefficients_in_training_only():
    router = TopK(2, balance=0.5, z_loss=0.25).bind(8, 4)
    x = torch.randn(16, 8)
    r = router(x)
    probs = torch.softmax(r.logits, -1)
    torch.testing.assert_close(r.losses["balance"], 0.5 * load_balancing_loss(probs, r.expert, 32))
    torch.testing.assert_close(r.losses["z_loss"], 0.25 * router_z_loss(r.logits))
    router.eval()
    assert router(x).losses == {}


def test_jitter_multiplies_the_router_input_only_in_training():
    """Switch: x * U(1 - j, 1 + j) feeds the router (not the logits, not the experts); eval is exact."""
    torch.manual_seed(0)
    router = TopK(2, jitter=0.5).bind(8, 4)
    x = torch.randn(16, 8)
    router.eval()
    torch.testing.assert_close(router(x).logits, x @ router.weight.detach().T)
    router.train()
    torch.manual_seed(123)
    noise = torch.empty_like(x).uniform_(0.5, 1.5)
    torch.manual_seed(123)
    r = router(x)
    torch.testing.assert_close(r.logits, (x * noise) @ router.weight.detach().T)
    assert not torch.allclose(r.logits, x @ router.weight.detach().T, atol=1e-3)
    # in an MoE layer the experts see the clean input
    moe = MoE(8, 16, 4, router=TopK(2, jitter=0.5, balance=0, z_loss=0)).train()
    y = moe(x)
    want, _ = reference_moe(moe, x, moe.last_routing)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@given(T=st.integers(0, 40), E=st.integers(1, 8), cf=st.floats(0.1, 4.0))
def test_expert_choice_takes_top_tokens(T, E, cf):
    router = ExpertChoice(cf).bind(6, E)
    x = torch.randn(T, 6)
    r = router(x)
    C = min(T, math.ceil(cf * T / E))
    assert r.counts().tolist() == [C] * E
    probs = torch.softmax(r.logits, -1)
    for e in range(E):
        chosen = r.token[r.expert == e]
        torch.testing.assert_close(probs[chosen, e], torch.topk(probs[:, e], C).values)


# ----------------------------------------------------------------------------------- hand-worked numbers

LN = math.log


def _identity_router(router, E):
    """Bind a linear router to d_model = E with the identity weight: its logits are the input."""
    router.bind(E, E)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


def test_topk_hand_worked_renormalised_and_raw():
    x = torch.tensor([[0.0, LN(3), LN(6)], [LN(4), 0.0, LN(5)]])  # probs [.1, .3, .6] and [.4, .1, .5]
    r = _identity_router(TopK(2, renormalize=True), 3)(x)
    assert r.token.tolist() == [0, 0, 1, 1] and r.expert.tolist() == [2, 1, 2, 0]
    torch.testing.assert_close(r.weight, torch.tensor([6 / 9, 3 / 9, 5 / 9, 4 / 9]))  # Mixtral
    r = _identity_router(TopK(2, renormalize=False), 3)(x)
    torch.testing.assert_close(r.weight, torch.tensor([0.6, 0.3, 0.5, 0.4]))  # Qwen2-MoE: raw softmax
    r = _identity_router(TopK(1, renormalize=False), 3)(x)
    assert r.expert.tolist() == [2, 2]
    torch.testing.assert_close(r.weight, torch.tensor([0.6, 0.5]))


@pytest.mark.parametrize("renorm,want", [(True, [6 / 9, 3 / 9]), (False, [0.6, 0.3])])
def test_topk_routed_scaling_factor(renorm, want):
    x = torch.tensor([[0.0, LN(3), LN(6)]])
    r = _identity_router(TopK(2, renormalize=renorm, scale=2.5), 3)(x)
    torch.testing.assert_close(r.weight, 2.5 * torch.tensor(want))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balanced_router_scores_exactly_one_for_any_k(k):
    """Uniform probabilities: E * sum_e f_e / E = sum_e f_e = 1 when f counts assignments (k if per token)."""
    router = TopK(k, balance=1.0, z_loss=0.0).bind(6, 4)
    with torch.no_grad():
        router.weight.zero_()
    r = router(torch.randn(10, 6))
    assert float(r.losses["balance"].detach()) == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_hand_worked():
    # two tokens with probs [.75, .25]; top-1: f = [1, 0], P = [.75, .25] -> 2 * .75 = 1.5
    x = torch.tensor([[LN(3), 0.0], [LN(3), 0.0]])
    r = _identity_router(TopK(1, renormalize=False, balance=1.0, z_loss=0.0), 2)(x)
    assert float(r.losses["balance"].detach()) == pytest.approx(1.5, abs=1e-6)
    # top-2 of 2: f = [.5, .5] per assignment -> 2 * (.5 * .75 + .5 * .25) = 1.0
    r = _identity_router(TopK(2, balance=1.0, z_loss=0.0), 2)(x)
    assert float(r.losses["balance"].detach()) == pytest.approx(1.0, abs=1e-6)
    # the function itself: 4 assignments, f = [.75, .25], P = [.5, .5] -> 2 * .5 = 1.0; P = [.75, .25] -> 1.25
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert float(load_balancing_loss(probs, torch.tensor([0, 0, 0, 1]))) == pytest.approx(2 * (0.75**2 + 0.25**2))
    assert float(load_balancing_loss(probs, torch.tensor([0, 0, 0, 1]), 4)) == pytest.approx(1.25)


def test_z_loss_hand_worked():
    # logsumexp of [0, 0] is ln 2, of [ln 3, 0] is ln 4 = 2 ln 2: mean of squares = 2.5 (ln 2)^2
    x = torch.tensor([[0.0, 0.0], [LN(3), 0.0]])
    assert float(router_z_loss(x)) == pytest.approx(2.5 * LN(2) ** 2)
    r = _identity_router(TopK(1, balance=0.0, z_loss=0.5), 2)(x)
    assert float(r.losses["z_loss"].detach()) == pytest.approx(0.5 * 2.5 * LN(2) ** 2)


def test_capacity_first_come_first_served_hand_worked():
    """T=8, E=2, k=1, capacity_factor 0.3: capacity = ceil(0.3 * 8 / 2) = ceil(1.2) = 2. Tokens 0, 1, 2, 4..7
    want expert 0 and token 3 expert 1: expert 0 keeps tokens 0 and 1; weights are not renormalised."""
    x = torch.tensor([[LN(3), 0.0]] * 8)
    x[3] = torch.tensor([0.0, LN(3)])
    router = _identity_router(TopK(1, renormalize=False, capacity_factor=0.3), 2)
    assert router.capacity(8) == 2
    r = router(x)
    assert r.token.tolist() == [0, 1, 3] and r.expert.tolist() == [0, 0, 1]
    torch.testing.assert_close(r.weight, torch.full((3,), 0.75))
    assert r.dropped == 5 and r.requested == 8


def test_expert_choice_hand_worked():
    """T=5, E=2, capacity_factor 1: C = ceil(5 / 2) = 3 tokens per expert, chosen by softmax probability
    (over experts, per token), which here is not the logit order."""
    x = torch.tensor([[3.0, 3.0], [1.0, 0.0], [0.5, -1.0], [0.0, 0.2], [-1.0, -3.0]])
    router = _identity_router(ExpertChoice(1.0), 2)
    assert router.capacity(5) == 3
    r = router(x)
    p0 = torch.sigmoid(x[:, 0] - x[:, 1])  # P(expert 0) = .5, .731, .818, .450, .881
    # expert 0: tokens 4, 2, 1 (by logit it would be 0, 1, 2); expert 1: tokens 3, 0, 1
    assert r.expert.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.token.tolist() == [4, 2, 1, 3, 0, 1]
    torch.testing.assert_close(r.weight, torch.stack([p0[4], p0[2], p0[1], 1 - p0[3], 1 - p0[0], 1 - p0[1]]))


def test_registry_builds_by_name_and_rejects_unknown():
    assert {"topk", "expert_choice"} <= set(available_routers())
    assert isinstance(build_router("topk", k=3), TopK)
    with pytest.raises(ValueError, match=r"unknown name 'nope'.*valid names"):
        build_router("nope")
    with pytest.raises(ValueError, match="router: unknown name"):
        MoE(8, 8, 4, router="nope")


def test_register_router_one_line():
    @register_router("test_first_expert")
    class FirstExpert(TopK):
        pass

    assert isinstance(MoE(8, 8, 4, router="test_first_expert").gate, FirstExpert)


def test_router_instance_cannot_serve_two_shapes():
    r = TopK(2)
    MoE(8, 8, 4, router=r)
    with pytest.raises(ValueError, match="already bound"):
        MoE(16, 8, 4, router=r)
