"""Routers against naive implementations and the loss formulas."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit import MoE, load_balancing_loss, router_z_loss
from moekit.routers import ExpertChoice, TopK, available_routers, build_router, register_router
from moekit.routers.topk import drop_over_capacity

from .reference import reference_topk


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


def test_jitter_only_in_training():
    router = TopK(2, jitter=0.5).bind(8, 4)
    x = torch.randn(16, 8)
    router.eval()
    torch.testing.assert_close(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


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
