"""DSelect-k (moekit/routers/dselect.py) and the multi-gate MoE (moekit/multitask.py): papers.md §1."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit
from moekit import MoE
from moekit.multitask import MultiGateMoE
from moekit.routers import DSelectK, TopK
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
