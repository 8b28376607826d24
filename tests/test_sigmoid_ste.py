"""SigmoidSTE, DSMoE's gate (moekit/routers/sigmoid_ste.py): papers.md §4."""


import pytest
import torch

from moekit import MoE
from moekit.routers import SigmoidSTE

from .reference import reference_moe

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
