"""The auxiliary losses of routing.py (load balancing, router z-loss) against hand-worked values and their formulas."""

import math

import pytest
import torch

from moekit import Routing, load_balancing_loss, router_z_loss
from moekit.routers import TopK
from tests.reference import identity_router

LN = math.log


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
    r = identity_router(TopK(1, renormalize=False, balance=1.0, z_loss=0.0), 2)(x)
    assert float(r.losses["balance"].detach()) == pytest.approx(1.5, abs=1e-6)
    # top-2 of 2: f = [.5, .5] per assignment -> 2 * (.5 * .75 + .5 * .25) = 1.0
    r = identity_router(TopK(2, balance=1.0, z_loss=0.0), 2)(x)
    assert float(r.losses["balance"].detach()) == pytest.approx(1.0, abs=1e-6)
    # the function itself: 4 assignments, f = [.75, .25], P = [.5, .5] -> 2 * .5 = 1.0; P = [.75, .25] -> 1.25
    probs = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert float(load_balancing_loss(probs, torch.tensor([0, 0, 0, 1]))) == pytest.approx(2 * (0.75**2 + 0.25**2))
    assert float(load_balancing_loss(probs, torch.tensor([0, 0, 0, 1]), 4)) == pytest.approx(1.25)


def test_z_loss_hand_worked():
    # logsumexp of [0, 0] is ln 2, of [ln 3, 0] is ln 4 = 2 ln 2: mean of squares = 2.5 (ln 2)^2
    x = torch.tensor([[0.0, 0.0], [LN(3), 0.0]])
    assert float(router_z_loss(x)) == pytest.approx(2.5 * LN(2) ** 2)
    r = identity_router(TopK(1, balance=0.0, z_loss=0.5), 2)(x)
    assert float(r.losses["z_loss"].detach()) == pytest.approx(0.5 * 2.5 * LN(2) ** 2)


def test_detach_keeps_every_field_without_history():
    w = torch.tensor([0.5, 1.5], requires_grad=True)
    imp = torch.tensor([2.0, 0.5], requires_grad=True)
    r = Routing(token=torch.tensor([0, 1]), expert=torch.tensor([1, 0]), weight=w * 2, num_tokens=2, num_experts=2,
                losses={"balance": (w * w).sum()}, logits=w.unsqueeze(0) * 3, dropped=1, requested=3,
                k_per_token=torch.tensor([1, 1]), importance=imp * 1)
    d = r.detach()
    assert d.weight.tolist() == [1.0, 3.0] and not d.weight.requires_grad
    assert float(d.losses["balance"]) == 2.5 and not d.losses["balance"].requires_grad
    assert d.logits.tolist() == [[1.5, 4.5]] and (d.dropped, d.requested) == (1, 3)
    assert d.k_per_token.tolist() == [1, 1] and d.importance.tolist() == [2.0, 0.5] and not d.importance.requires_grad
