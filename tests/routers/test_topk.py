"""Top-k routing against a naive implementation and hand-worked values; capacity, jitter, losses in training."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit import MoE, load_balancing_loss, router_z_loss
from moekit.routers import TopK
from moekit.routers.topk import drop_over_capacity
from tests.reference import identity_router, reference_moe, reference_topk


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


# ----------------------------------------------------------------------------------- hand-worked numbers

LN = math.log




def test_topk_hand_worked_renormalised_and_raw():
    x = torch.tensor([[0.0, LN(3), LN(6)], [LN(4), 0.0, LN(5)]])  # probs [.1, .3, .6] and [.4, .1, .5]
    r = identity_router(TopK(2, renormalize=True), 3)(x)
    assert r.token.tolist() == [0, 0, 1, 1] and r.expert.tolist() == [2, 1, 2, 0]
    torch.testing.assert_close(r.weight, torch.tensor([6 / 9, 3 / 9, 5 / 9, 4 / 9]))  # Mixtral
    r = identity_router(TopK(2, renormalize=False), 3)(x)
    torch.testing.assert_close(r.weight, torch.tensor([0.6, 0.3, 0.5, 0.4]))  # Qwen2-MoE: raw softmax
    r = identity_router(TopK(1, renormalize=False), 3)(x)
    assert r.expert.tolist() == [2, 2]
    torch.testing.assert_close(r.weight, torch.tensor([0.6, 0.5]))


@pytest.mark.parametrize("renorm,want", [(True, [6 / 9, 3 / 9]), (False, [0.6, 0.3])])
def test_topk_routed_scaling_factor(renorm, want):
    x = torch.tensor([[0.0, LN(3), LN(6)]])
    r = identity_router(TopK(2, renormalize=renorm, scale=2.5), 3)(x)
    torch.testing.assert_close(r.weight, 2.5 * torch.tensor(want))


def test_capacity_first_come_first_served_hand_worked():
    """T=8, E=2, k=1, capacity_factor 0.3: capacity = ceil(0.3 * 8 / 2) = ceil(1.2) = 2. Tokens 0, 1, 2, 4..7
    want expert 0 and token 3 expert 1: expert 0 keeps tokens 0 and 1; weights are not renormalised."""
    x = torch.tensor([[LN(3), 0.0]] * 8)
    x[3] = torch.tensor([0.0, LN(3)])
    router = identity_router(TopK(1, renormalize=False, capacity_factor=0.3), 2)
    assert router.capacity(8) == 2
    r = router(x)
    assert r.token.tolist() == [0, 1, 3] and r.expert.tolist() == [0, 0, 1]
    torch.testing.assert_close(r.weight, torch.full((3,), 0.75))
    assert r.dropped == 5 and r.requested == 8


def test_router_instance_cannot_serve_two_shapes():
    r = TopK(2)
    MoE(8, 8, 4, router=r)
    with pytest.raises(ValueError, match="already bound"):
        MoE(16, 8, 4, router=r)
