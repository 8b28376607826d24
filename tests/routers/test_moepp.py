"""The MoE++ router against hand-worked numbers: gating residual, heterogeneous balance loss,
per-kind capacities, the code's variants (renormalize_zero, mlp)."""

import math

import pytest
import torch
from torch import nn

from moekit import MoE, Routing
from moekit.routers import MoEPP, build_router
from moekit.routers.moepp import heterogeneous_balance_loss
from tests.reference import reference_experts


def _router(N, D=None, kinds=None, **kw):
    """A router bound to ``N`` experts whose linear map is the identity (``D = N``), so that an input
    ``x = log p`` routes with probabilities exactly ``p``."""
    r = MoEPP(**kw).bind(D or N, N)
    with torch.no_grad():
        r.weight.copy_(torch.eye(N, D or N))
    if kinds:
        r.set_expert_kinds(*kinds)
    return r


def _log(p):
    return torch.tensor(p, dtype=torch.float32).log()


def test_gating_residual_adds_w_g_times_the_previous_layers_logits():
    """Two layers, D = 2, N = 3: G1 = W1 x1 = [1, 2, 3]; G2 = W2 x2 + W_g G1 = [-1, 3, 0] + [6, 0, 1]."""
    r1, r2 = MoEPP(k=1).bind(2, 3), MoEPP(k=1).bind(2, 3)
    with torch.no_grad():
        r1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        r2.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))
        r2.residual_weight.copy_(torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    g1 = r1(torch.tensor([[1.0, 2.0]])).logits
    assert g1.tolist() == [[1.0, 2.0, 3.0]]
    routing = r2(torch.tensor([[3.0, -1.0]]), gate_residual=g1)
    assert routing.logits.tolist() == [[5.0, 3.0, 1.0]]
    alone = r2(torch.tensor([[3.0, -1.0]]))  # as a first MoE layer: no residual
    assert alone.logits.tolist() == [[-1.0, 3.0, 0.0]]
    assert routing.expert.tolist() == [0] and alone.expert.tolist() == [1]  # the residual changed the choice
    # the residual carries the gradient back to the previous layer's router
    routing.weight.sum().backward()
    assert r1.weight.grad is not None and r1.weight.grad.abs().sum() > 0
    assert r2.residual_weight.grad is not None


def test_gating_residual_errors_and_residual_false():
    r = MoEPP().bind(4, 3)
    with pytest.raises(ValueError, match=r"gate_residual must be the previous MoE layer's logits \[2, 3\], got \(2, 4\)"):
        r(torch.randn(2, 4), gate_residual=torch.randn(2, 4))
    plain = MoEPP(residual=False).bind(4, 3)
    assert plain.context_keys == () and plain.residual_weight is None and r.context_keys == ("gate_residual",)
    with pytest.raises(ValueError, match="residual=False"):
        plain(torch.randn(2, 4), gate_residual=torch.randn(2, 3))


def test_heterogeneous_balance_loss_by_hand():
    """T = 2, N = 3 (2 FFN, 1 zero-computation), tau = 0.5, top-2:
    probs [[.5, .3, .2], [.1, .3, .6]] select {0, 1} and {2, 1}: f = [.5, 1, .5], P = [.3, .3, .4],
    L_b = 1 * .5 * .3 + 1 * 1 * .3 + .5 * .5 * .4 = 0.55."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]], dtype=torch.float64)
    eta = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    expert = torch.tensor([0, 1, 2, 1])
    assert float(heterogeneous_balance_loss(probs, expert, eta)) == pytest.approx(0.55, abs=1e-12)
    r = _router(3, kinds=(2, 1), k=2, tau=0.5, balance=0.1, residual=False)
    assert r.eta().tolist() == [1.0, 1.0, 0.5]
    routing = r.train()(_log(probs.tolist()))
    assert routing.expert.tolist() == [0, 1, 2, 1]
    assert float(routing.losses["balance"].detach()) == pytest.approx(0.1 * 0.55, rel=1e-6)
    assert not r.eval()(_log(probs.tolist())).losses  # training mode only


def test_capacities_by_hand_per_kind():
    """T = 8, N_FFN = 2, N_ZC = 2, tau = 0.5, gamma = 2: tau N_FFN + N_ZC = 3, so
    C_FFN = ceil(2 * .5 * 8 / 3) = 3 and C_ZC = ceil(2 * 8 / 3) = 6."""
    r = _router(4, kinds=(2, 1, 1), k=2, tau=0.5, capacity_factor=2.0, residual=False)
    assert r.capacities(8).tolist() == [3, 3, 6, 6]
    assert MoEPP().bind(4, 4).capacities(8) is None
    # tokens 0..7 all pick FFN expert 0 then zero expert 2; tokens 6, 7 pick copy expert 3 over 2
    p = [[0.5, 0.1, 0.3, 0.1]] * 6 + [[0.5, 0.1, 0.1, 0.3]] * 2
    routing = r(_log(p))
    pairs = list(zip(routing.token.tolist(), routing.expert.tolist()))
    want = [(t, 0) for t in range(3)] + [(t, 2) for t in range(6)] + [(6, 3), (7, 3)]
    assert sorted(pairs) == sorted(want)
    assert routing.dropped == 5 and routing.requested == 16  # expert 0 drops tokens 3..7
    # gamma = 1: C_FFN = ceil(4 / 3) = 2, C_ZC = ceil(8 / 3) = 3
    r1 = _router(4, kinds=(2, 1, 1), k=2, tau=0.5, capacity_factor=1.0, residual=False)
    kept = r1(_log(p))
    assert sorted(zip(kept.token.tolist(), kept.expert.tolist())) == sorted(
        [(0, 0), (1, 0), (0, 2), (1, 2), (2, 2), (6, 3), (7, 3)])
    assert kept.dropped == 9


def test_weights_follow_the_paper_and_renormalize_zero_follows_the_code():
    """N_FFN = 2 and one zero expert (id 2). Paper: the chosen softmax probabilities. Code: the zero
    expert's weight 0 and the k weights renormalised."""
    p = [[0.5, 0.2, 0.3], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]]
    paper = _router(3, kinds=(2, 1), k=2, residual=False)(_log(p))
    code = _router(3, kinds=(2, 1), k=2, residual=False, renormalize_zero=True)(_log(p))
    assert paper.expert.tolist() == code.expert.tolist() == [0, 2, 2, 1, 0, 1]
    torch.testing.assert_close(paper.weight, torch.tensor([0.5, 0.3, 0.6, 0.3, 0.5, 0.4]))
    torch.testing.assert_close(code.weight, torch.tensor([1.0, 0.0, 0.0, 1.0, 5 / 9, 4 / 9]))


def test_renormalize_zero_gives_the_ffn_expert_its_full_output_in_the_layer():
    torch.manual_seed(0)
    moe = MoE(4, 8, 2, router=MoEPP(k=2, renormalize_zero=True, residual=False), zero_experts=1)
    x = torch.randn(6, 4)
    r = moe.gate(x)
    with_zero = (r.expert == 2).view(6, 2).any(-1)
    assert with_zero.any()
    y = moe(x, routing=r)
    ffn = (r.expert < 2) & with_zero[r.token]  # the FFN expert of each token that also chose the zero expert
    full = Routing(r.token[ffn], r.expert[ffn], torch.ones(int(ffn.sum())), 6, 2)
    torch.testing.assert_close(y[with_zero], reference_experts(x, full, moe.experts)[with_zero], rtol=1e-5, atol=1e-6)


def test_mlp_router_is_two_bias_free_layers_with_tanh():
    r = MoEPP(k=1, mlp=True, residual=False).bind(3, 2)
    assert r.hidden_weight.shape == (16, 3) and r.weight.shape == (2, 16)
    x = torch.randn(5, 3)
    W1, W2 = r.hidden_weight.detach().double(), r.weight.detach().double()
    want = torch.stack([W2 @ torch.tanh(W1 @ xi) for xi in x.double()])
    got = r(x).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_registered_defaults_and_the_layer_tells_the_router_the_kinds():
    r = build_router("moepp")
    assert isinstance(r, MoEPP) and (r.k, r.tau, r.balance, r.capacity_factor) == (2, 0.75, 0.01, None)
    assert not r.renormalize_zero and not r.mlp and r.residual
    moe = MoE(8, 8, 4, router="moepp", zero_experts=1, copy_experts=1, constant_experts=2)
    assert moe.gate.num_experts == 8 and moe.gate.kinds == (4, 1, 1, 2) and moe.num_experts == 4
    assert moe.gate.residual_weight.shape == (8, 8) and moe.gate.weight.shape == (8, 8)
    bound = 1 / math.sqrt(8)  # nn.Linear's default init, as the code
    assert float(moe.gate.residual_weight.detach().abs().max()) <= bound
    with pytest.raises(ValueError, match="do not add up"):
        MoEPP().bind(4, 5).set_expert_kinds(4, 2)
    with pytest.raises(ValueError, match="tau"):
        MoEPP(tau=0)
    with pytest.raises(ValueError, match="k=3 must be <="):
        MoE(4, 4, 1, router=MoEPP(k=3), zero_experts=1)
    assert isinstance(moe.gate.weight, nn.Parameter)
