"""SigmoidSTE, DSMoE's gate (moekit/routers/sigmoid_ste.py): papers.md §4.2, eq. 8-19.

Every expected value and gradient here comes from an oracle written in this file from the paper's
formulas, in float64, by hand (no autograd, no moekit code): the gate ``q = sigmoid(x Y^T)``, the
threshold ``G(q) = q [q > tau]``, the rescale ``n / max(#active, 1)``, the straight-through
estimator (forward ``G``, backward ``dq/dlogit = sigmoid'``), and the L1 sparsity loss ``mean G``.
"""

import pytest
import torch

from moekit import MoE
from moekit.routers import SigmoidSTE
from tests.reference import reference_moe

D, F, E = 8, 6, 4


def _moe(tau=0.5, sparsity=1.0, **kw):
    torch.manual_seed(0)
    moe = MoE(D, F, E, router=SigmoidSTE(tau=tau, sparsity=sparsity, **kw))
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)  # logits of a few units: gates on both sides of tau
    return moe


def _inputs(T=12, zero_token=True):
    torch.manual_seed(1)
    x = torch.randn(T, D)
    if zero_token:
        x[-1] = 0  # q = sigmoid(0) = 0.5 = tau exactly: no active gate (the clamp to 1)
    return x


def _sig(z):
    return 1 / (1 + torch.exp(-z))


def _oracle(moe, x, R, tau, ste=True, rescale=True):
    """Forward and the gradients of ``L = sum(y * R)`` by hand (papers.md §4.2)."""
    X = x.detach().double()
    Y = moe.gate.weight.detach().double()  # [E, D]
    W1 = moe.experts.gate_up_proj.detach().double()  # [E, 2F, D], gate rows first
    W2 = moe.experts.down_proj.detach().double()  # [E, D, F]
    Wg, Wu = W1[:, :F], W1[:, F:]
    a = torch.einsum("efd,td->tef", Wg, X)
    b = torch.einsum("efd,td->tef", Wu, X)
    s = _sig(a)
    h = a * s * b  # silu(gate) * up
    o = torch.einsum("edf,tef->ted", W2, h)  # every expert's output o_te (eq. 2)
    logit = X @ Y.T
    q = _sig(logit)
    active = (q > tau).double()
    n_active = active.sum(-1, keepdim=True)
    c = E / torch.clamp(n_active, min=1) if rescale else torch.ones_like(n_active)
    w = q * active * c  # G(q) * n / #active (eq. 8)
    y = torch.einsum("te,ted->td", w, o)
    Rd = R.double()
    ro = torch.einsum("td,ted->te", Rd, o)
    # dL/dlogit: STE passes d/dq to the logit through sigmoid' = q (1 - q), for every gate (eq. 13-16);
    # without the STE, G(q) = q [q > tau] differentiates to [q > tau] sigmoid'.
    dlogit = q * (1 - q) * c * ro * (1.0 if ste else active)
    dY = dlogit.T @ X
    dh = torch.einsum("te,edf,td->tef", w, W2, Rd)
    dW2 = torch.einsum("te,td,tef->edf", w, Rd, h)
    da = dh * b * s * (1 + a * (1 - s))
    db = dh * a * s
    dW1 = torch.cat([torch.einsum("tef,td->efd", da, X), torch.einsum("tef,td->efd", db, X)], dim=1)
    dX = dlogit @ Y + torch.einsum("tef,efd->td", da, Wg) + torch.einsum("tef,efd->td", db, Wu)
    return {"o": o, "q": q, "active": active.bool(), "c": c, "w": w, "y": y, "dY": dY, "dW1": dW1, "dW2": dW2, "dX": dX}


def _close(actual, expected, tol=2e-5):
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


def _check_mixture(ref):
    """The data must exercise the cases: tokens with different #active, inactive gates, a token with none."""
    counts = ref["active"].sum(-1)
    assert len(set(counts.tolist())) >= 3 and int(counts[-1]) == 0
    assert 0 < int(ref["active"].sum()) < ref["active"].numel()


# ----------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("tau", [0.5, 0.3, 0.7])
@pytest.mark.parametrize("rescale", [True, False])
def test_forward_matches_the_paper_in_training_and_inference(tau, rescale):
    moe = _moe(tau, rescale=rescale)
    x = _inputs()
    ref = _oracle(moe, x, torch.zeros(x.shape[0], D), tau, rescale=rescale)
    if tau == 0.5:
        _check_mixture(ref)
    for mode in (True, False):
        moe.train(mode)
        y = moe(x)
        _close(y, ref["y"])
        r = moe.last_routing
        _close(torch.sigmoid(r.logits), ref["q"])
        if mode:  # training: every (token, expert) pair, weight G(q) * n / #active (0 for inactive gates)
            assert r.num_assignments == x.shape[0] * E
            dense_w = torch.zeros(x.shape[0], E, dtype=torch.float64)
            dense_w[r.token, r.expert] = r.weight.detach().double()
            _close(dense_w, ref["w"])
        else:  # inference: exactly the active pairs, nothing else computed
            got = sorted(zip(r.token.tolist(), r.expert.tolist()))
            assert got == sorted(map(tuple, torch.nonzero(ref["active"]).tolist()))
            _close(r.weight, ref["w"][r.token, r.expert])
            assert r.num_assignments == int(ref["active"].sum())


def test_rescale_is_n_over_active_with_threshold_strict():
    """x[:, 0] = 1, other inputs 0: q = (s(3), s(0) = tau, s(-3), s(3)); the gate exactly at tau is
    off (G(x) = x if x > tau), so #active = 2 and the rescale is 4 / 2 = 2."""
    moe = _moe(sparsity=0.0)
    x = torch.zeros(5, D)
    x[:, 0] = 1.0
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, 0] = torch.tensor([3.0, 0.0, -3.0, 3.0])
    moe.eval()
    y = moe(x)
    r = moe.last_routing
    assert sorted(set(r.expert.tolist())) == [0, 3] and r.num_assignments == 10
    q3 = 1 / (1 + torch.exp(torch.tensor(-3.0, dtype=torch.float64)))
    _close(r.weight, torch.full((10,), float(q3 * 4 / 2), dtype=torch.float64))
    torch.testing.assert_close(y, reference_moe(moe, x, routing=r)[0])
    moe.train()
    torch.testing.assert_close(moe(x), y, atol=1e-6, rtol=1e-6)  # training computes all, same value


def test_no_active_gate_gives_zero_output_not_nan():
    moe = _moe()
    with torch.no_grad():
        moe.gate.weight.fill_(0)
    x = torch.randn(3, 8)  # q = 0.5 exactly: not > tau
    for mode in (True, False):
        moe.train(mode)
        y = moe(x + 0.0)
        assert torch.equal(y, torch.zeros_like(y))
        if mode:
            assert torch.equal(moe.last_routing.weight, torch.zeros(3 * E))


# ----------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
def test_gradients_match_the_paper(ste, rescale):
    """STE (eq. 10-16): dL/dY_i = sum_t x_t sigmoid'(x_t Y_i) c_t <dL/dy_t, o_ti> for EVERY gate, the
    experts get gradient only through active gates; the no-STE ablation (train with G) drops the
    inactive gates' term. Checked on the router weight, the input and the expert weights."""
    moe = _moe(rescale=rescale, ste=ste, sparsity=0.0)
    x = _inputs().requires_grad_(True)
    torch.manual_seed(2)
    R = torch.randn(x.shape[0], D)
    ref = _oracle(moe, x, R, 0.5, ste=ste, rescale=rescale)
    _check_mixture(ref)
    moe.train()
    y = moe(x)
    if not ste:  # nothing can reach an inactive gate: its expert is not even computed
        assert moe.last_routing.num_assignments == int(ref["active"].sum())
    (y * R).sum().backward()
    _close(y, ref["y"])
    _close(moe.gate.weight.grad, ref["dY"])
    _close(x.grad, ref["dX"])
    _close(moe.experts.gate_up_proj.grad, ref["dW1"])
    _close(moe.experts.down_proj.grad, ref["dW2"])


def test_ste_pattern_gate_below_tau_learns_its_expert_does_not():
    """papers.md §4.5 check (2), by value: a gate below tau gets sum_t x_t sigmoid'(-3) (4 / 2) <R_t, o_ti>,
    its expert's weights get exactly zero; the active experts' weights get G(q) (4 / 2) R_t h_ti^T."""
    moe = _moe(sparsity=0.0)
    x = torch.randn(5, D)
    x[:, 0] = 1.0
    with torch.no_grad():  # experts 0, 1 active (q = sigmoid(3) > 0.5); experts 2, 3 inactive (sigmoid(-3))
        moe.gate.weight.zero_()
        moe.gate.weight[:, 0] = torch.tensor([3.0, 3.0, -3.0, -3.0])
    torch.manual_seed(3)
    R = torch.randn(5, D)
    ref = _oracle(moe, x, R, 0.5)
    assert ref["active"][:, :2].all() and not ref["active"][:, 2:].any()
    moe(x).mul(R).sum().backward()
    gw = moe.gate.weight.grad
    _close(gw, ref["dY"])
    sp = 0.045176659730912144  # sigmoid'(3) = sigmoid'(-3): the STE's backward multiplier
    for e in (2, 3):  # x[:, 0] = 1: column 0 is the plain sum over tokens
        expected = sum(sp * 2.0 * float(R[t].double() @ ref["o"][t, e]) for t in range(5))
        assert float(gw[e, 0]) == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert abs(expected) > 1e-3  # not trivially zero
    dW1 = moe.experts.gate_up_proj.grad
    dW2 = moe.experts.down_proj.grad
    assert torch.equal(dW1[2:], torch.zeros_like(dW1[2:])) and torch.equal(dW2[2:], torch.zeros_like(dW2[2:]))
    _close(dW1[:2], ref["dW1"][:2])
    _close(dW2[:2], ref["dW2"][:2])


# ----------------------------------------------------------------------------------- sparsity loss


@pytest.mark.parametrize("grad", ["G", "S"])
@pytest.mark.parametrize("coef", [1.0, 0.25])
def test_sparsity_loss_value_and_gradient(grad, coef):
    """L = coef * mean_{t,i} G(q_ti) (eq. 17-19): the same value under both options. Its gradient
    through the logit is coef / (T n) * sigmoid' times [q > tau] under "G" (eq. 19 as written: only
    active gates), for every gate under "S" (the STE form)."""
    moe = _moe(sparsity=coef, sparsity_grad=grad)
    x = _inputs().requires_grad_(True)
    ref = _oracle(moe, x, torch.zeros(x.shape[0], D), 0.5)
    _check_mixture(ref)
    moe.train()
    moe(x)
    loss = moe.last_routing.losses["sparsity"]
    T = x.shape[0]
    q, active = ref["q"], ref["active"].double()
    _close(loss, coef * (q * active).sum() / (T * E))
    loss.backward()
    dlogit = coef / (T * E) * q * (1 - q) * (active if grad == "G" else torch.ones_like(active))
    Y = moe.gate.weight.detach().double()
    _close(moe.gate.weight.grad, dlogit.T @ x.detach().double(), tol=1e-6)
    _close(x.grad, dlogit @ Y, tol=1e-6)


def test_sparsity_loss_absent_in_eval_and_at_coefficient_zero():
    moe = _moe(sparsity=0.0)
    moe(_inputs())
    assert moe.last_routing.losses == {}
    moe = _moe(sparsity=1.0).eval()
    moe(_inputs())
    assert moe.last_routing.losses == {}


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, 1.5])
def test_tau_outside_unit_interval(tau):
    with pytest.raises(ValueError, match="tau must lie in"):
        SigmoidSTE(tau=tau)


def test_sparsity_grad_must_be_g_or_s():
    with pytest.raises(ValueError, match="sparsity_grad must be 'G' or 'S'"):
        SigmoidSTE(sparsity_grad="L1")
