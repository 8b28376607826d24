"""DSelect-k (moekit/routers/dselect.py) and the multi-gate MoE (moekit/models/mmoe.py): papers.md §1.

Every equation is checked against an oracle written here from the formulas of papers.md §1.2-1.3
(plain Python floats, or a second torch implementation that never calls moekit's DSelect code),
against hand-worked numbers, or with ``torch.autograd.gradcheck`` in float64.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit import MoE, Routing, aux_loss
from moekit.models.mmoe import MultiGateMoE
from moekit.routers import DSelectK, TopK
from moekit.routers.dselect import binary_codes, selector_outputs, smooth_step
from tests.reference import reference_experts

# The router computes its gate in float32; the oracles below run in float64.
F32 = {"rtol": 2e-5, "atol": 1e-7}

# ----------------------------------------------------------------------------------- oracles (papers.md §1)


def ref_s(t: float, g: float) -> float:
    """Smooth-step S(t; gamma)."""
    if t <= -g / 2:
        return 0.0
    if t >= g / 2:
        return 1.0
    return -2 * t**3 / g**3 + 3 * t / (2 * g) + 0.5


def ref_ds(t: float, g: float) -> float:
    """S'(t; gamma): -6t^2/gamma^3 + 3/(2 gamma) inside the band, 0 outside."""
    return 0.0 if abs(t) >= g / 2 else -6 * t**2 / g**3 + 3 / (2 * g)


def ref_codes(n: int) -> list[list[int]]:
    """Row i = i in binary with m = ceil(log2 n) digits, most significant bit first."""
    m = math.ceil(math.log2(n)) if n > 1 else 0
    return [[int(c) for c in format(i, f"0{m}b")] if m else [] for i in range(n)]


def ref_selector(z: list[float], n: int, g: float) -> list[float]:
    """r_i = prod_j (S(z_j) if B[i, j] else 1 - S(z_j))."""
    return [math.prod(ref_s(zj, g) if b else 1 - ref_s(zj, g) for zj, b in zip(z, code, strict=True))
            for code in ref_codes(n)]


def ref_softmax(w: list[float]) -> list[float]:
    e = [math.exp(v - max(w)) for v in w]
    return [v / sum(e) for v in e]


def ref_gate(Z: list[list[float]], w: list[float], n: int, g: float) -> tuple[list[list[float]], list[float]]:
    """One gate: the k selector outputs R[k][n] and q = sum_s softmax(w)_s R[s]."""
    R = [ref_selector(z, n, g) for z in Z]
    p = ref_softmax(w)
    return R, [sum(p[s] * R[s][i] for s in range(len(Z))) for i in range(n)]


def ref_entropy(Rs: list[list[float]]) -> float:
    """- sum over every entry of r log(r + 1e-6)."""
    return -sum(r * math.log(r + 1e-6) for row in Rs for r in row)


def ref_unreachable(Rs: list[list[float]]) -> float:
    """sum over selectors of 1 / sum_{i < n} r_i."""
    return sum(1 / sum(row) for row in Rs)


def ref_static(router: DSelectK, task: int) -> tuple[list[list[float]], list[float]]:
    Z = router.z_logits.detach().double()[task].tolist()
    w = router.w_logits.detach().double()[task].tolist()
    return ref_gate(Z, w, router.num_experts, router.gamma)


def ref_per_example(router: DSelectK, x: torch.Tensor) -> list[tuple[list[list[float]], list[float]]]:
    """Per token: z = reshape(W_z x + b_z, [k, m]), w = W_w x + b_w (dot products written out)."""
    Wz, bz = router.z_proj.weight.detach().double().tolist(), router.z_proj.bias.detach().double().tolist()
    Ww, bw = router.w_proj.weight.detach().double().tolist(), router.w_proj.bias.detach().double().tolist()
    k, m = router.k, len(ref_codes(router.num_experts)[0])
    out = []
    for xt in x.detach().double().tolist():
        zt = [sum(a * b for a, b in zip(row, xt)) + c for row, c in zip(Wz, bz, strict=True)]
        wt = [sum(a * b for a, b in zip(row, xt)) + c for row, c in zip(Ww, bw, strict=True)]
        out.append(ref_gate([zt[s * m : (s + 1) * m] for s in range(k)], wt, router.num_experts, router.gamma))
    return out


def torch_oracle_q(z_TSM: torch.Tensor, w_TS: torch.Tensor, n: int, g: float) -> torch.Tensor:
    """A second, differentiable torch implementation of q[T, n] (for gradients), from the formulas."""
    inside = (z_TSM.abs() < g / 2).to(z_TSM.dtype)
    s = inside * (-2 * z_TSM**3 / g**3 + 3 * z_TSM / (2 * g) + 0.5) + (z_TSM >= g / 2).to(z_TSM.dtype)
    cols = []
    for code in ref_codes(n):
        r = torch.ones_like(z_TSM[..., 0])
        for j, b in enumerate(code):
            r = r * (s[..., j] if b else 1 - s[..., j])
        cols.append(r)
    R = torch.stack(cols, dim=-1)  # [T, S, n]
    e = torch.exp(w_TS - w_TS.max(dim=-1, keepdim=True).values.detach())
    p = e / e.sum(dim=-1, keepdim=True)
    return (p.unsqueeze(-1) * R).sum(dim=1)


def dense(r: Routing) -> torch.Tensor:
    q = torch.zeros(r.num_tokens, r.num_experts, dtype=torch.float64)
    q[r.token, r.expert] = r.weight.detach().double()
    return q


def t64(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


# ----------------------------------------------------------------------------------- smooth-step


def test_smooth_step_hand_values():
    t = t64([0.0, 0.25, -0.25, 0.5, -0.5, 0.7, -3.0]).requires_grad_()
    s = smooth_step(t, 1.0)
    torch.testing.assert_close(s.detach(), t64([0.5, 0.84375, 0.15625, 1.0, 0.0, 1.0, 0.0]), rtol=0, atol=1e-15)
    (grad,) = torch.autograd.grad(s.sum(), t)
    torch.testing.assert_close(grad, t64([1.5, 1.125, 1.125, 0.0, 0.0, 0.0, 0.0]), rtol=0, atol=1e-15)
    # gamma = 0.1 (the experiment's): S(0.025) = S(1/4; 1), S'(0) = 3 / (2 gamma) = 15
    t = t64([0.025, 0.0]).requires_grad_()
    s = smooth_step(t, 0.1)
    torch.testing.assert_close(s.detach(), t64([0.84375, 0.5]))
    torch.testing.assert_close(torch.autograd.grad(s.sum(), t)[0], t64([11.25, 15.0]))


@pytest.mark.parametrize("gamma", [0.1, 0.37, 1.0, 2.5])
def test_smooth_step_matches_formula(gamma):
    pts = [gamma * f for f in (-0.9, -0.5, -0.499, -0.3, -0.1, 0.0, 0.05, 0.2, 0.45, 0.5, 0.501, 1.3)]
    t = t64(pts).requires_grad_()
    s = smooth_step(t, gamma)
    torch.testing.assert_close(s.detach(), t64([ref_s(v, gamma) for v in pts]), rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(s.sum(), t)
    torch.testing.assert_close(grad, t64([ref_ds(v, gamma) for v in pts]), rtol=1e-12, atol=1e-12)
    inner = (torch.linspace(-0.45, 0.45, 11, dtype=torch.float64) * gamma).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: smooth_step(u, gamma), (inner,))


# ----------------------------------------------------------------------------------- binary code, selectors


def test_binary_codes_msb_first():
    assert binary_codes(4).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert binary_codes(6).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1]]
    assert binary_codes(1).shape == (1, 0)
    for n in range(1, 20):
        assert binary_codes(n).tolist() == ref_codes(n), n


def test_selector_hand_values():
    # gamma = 1, z = (0.25, -0.25): S = (0.84375, 0.15625); codes 00, 01, 10, 11
    r = selector_outputs(t64([[[0.25, -0.25]]]), binary_codes(4).double(), 1.0).flatten()
    a, b = 0.84375, 0.15625
    torch.testing.assert_close(r, t64([b * a, b * b, a * a, a * b]), rtol=0, atol=1e-15)
    r = selector_outputs(t64([[[0.5, -0.5]]]), binary_codes(4).double(), 1.0).flatten()
    assert r.tolist() == [0.0, 0.0, 1.0, 0.0]  # code "10" = expert 2
    r0 = selector_outputs(torch.zeros(1, 1, 2), binary_codes(4), 1.0)
    assert r0.flatten().tolist() == [0.25, 0.25, 0.25, 0.25]


@pytest.mark.parametrize("n,gamma", [(2, 1.0), (3, 0.5), (5, 0.1), (6, 2.0), (8, 1.0), (11, 0.3)])
def test_selector_outputs_match_oracle(n, gamma):
    m = math.ceil(math.log2(n))
    z = (torch.rand(4, 3, m, dtype=torch.float64) - 0.5) * 1.3 * gamma  # some entries saturated
    r = selector_outputs(z, binary_codes(n).double(), gamma)
    want = t64([[ref_selector(zs, n, gamma) for zs in zt] for zt in z.tolist()])
    torch.testing.assert_close(r, want, rtol=1e-12, atol=1e-14)
    zin = ((torch.rand(2, 2, m, dtype=torch.float64) - 0.5) * 0.9 * gamma).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: selector_outputs(u, binary_codes(n).double(), gamma), (zin,))


@given(z=st.lists(st.floats(-2, 2), min_size=3, max_size=3), n=st.sampled_from([2, 4, 8]))
def test_selection_sums_to_one_for_powers_of_two(z, n):
    m = int(math.log2(n))
    r = selector_outputs(t64(z[:m]).view(1, 1, m), binary_codes(n).double(), 1.0)
    torch.testing.assert_close(r.flatten(), t64(ref_selector(z[:m], n, 1.0)), rtol=1e-12, atol=1e-14)
    assert float(r.sum()) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------------- the gate: static and per-example


def test_selector_softmax_hand_values():
    # two saturated selectors: (0.5, -0.5) -> expert 2 ("10"), (-0.5, 0.5) -> expert 1 ("01");
    # w = (0, ln 3): softmax over the k selectors = (1/4, 3/4)
    router = DSelectK(2, per_example=False).bind(8, 4)
    with torch.no_grad():
        router.z_logits.copy_(torch.tensor([[[0.5, -0.5], [-0.5, 0.5]]]))
        router.w_logits.copy_(torch.tensor([[0.0, math.log(3)]]))
    r = router(torch.randn(3, 8))
    assert r.token.tolist() == [0, 0, 1, 1, 2, 2] and r.expert.tolist() == [1, 2, 1, 2, 1, 2]
    torch.testing.assert_close(r.weight, torch.tensor([0.75, 0.25] * 3))


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_static_gate_matches_oracle(gamma):
    router = DSelectK(3, gamma=gamma, per_example=False, num_tasks=3).bind(8, 6)
    with torch.no_grad():  # inside the band, away from the init, so every term matters
        router.z_logits.copy_((torch.rand(3, 3, 3) - 0.5) * 0.8 * gamma)
        router.w_logits.copy_(torch.randn(3, 3))
    x = torch.randn(5, 8)
    for task in range(3):
        R, q = ref_static(router, task)
        r_TSE, q_TE = router.gate(x, task=task)
        torch.testing.assert_close(r_TSE.double(), t64([R] * 5), **F32)
        torch.testing.assert_close(q_TE.double(), t64([q] * 5), **F32)
        torch.testing.assert_close(dense(router(x, task=task)), t64([q] * 5), **F32)
    tasks = torch.tensor([2, 0, 1, 2, 0])  # a task id per token
    want = t64([ref_static(router, t)[1] for t in tasks.tolist()])
    torch.testing.assert_close(dense(router(x, task=tasks)), want, **F32)
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\), got \[3\]"):
        router(x, task=3)


@pytest.mark.parametrize("gamma", [0.1, 0.6])
def test_per_example_gate_matches_oracle(gamma):
    router = DSelectK(3, gamma=gamma).bind(6, 5)
    with torch.no_grad():  # z = W x + b lands inside the band for most tokens
        router.z_proj.weight.copy_(torch.randn(9, 6) * 0.15 * gamma)
        router.z_proj.bias.copy_(torch.randn(9) * 0.15 * gamma)
        router.w_proj.weight.copy_(torch.randn(3, 6))
        router.w_proj.bias.copy_(torch.randn(3))
    x = torch.randn(7, 8, 6)[:, 0]  # a non-contiguous input
    oracle = ref_per_example(router, x)
    r_TSE, q_TE = router.gate(x)
    torch.testing.assert_close(r_TSE.double(), t64([R for R, _ in oracle]), **F32)
    torch.testing.assert_close(q_TE.double(), t64([q for _, q in oracle]), **F32)
    routing = router(x)  # the routing weights are the selection weights, exact zeros dropped
    torch.testing.assert_close(dense(routing), t64([q for _, q in oracle]), **F32)
    assert routing.num_assignments == int((q_TE > 0).sum())


def test_per_example_gate_gradient_matches_oracle():
    router = DSelectK(2, gamma=0.5).bind(4, 6)
    with torch.no_grad():
        router.z_proj.weight.mul_(10)
        router.z_proj.bias.mul_(10)
        router.w_proj.weight.normal_()
    x = torch.randn(5, 4, requires_grad=True)
    g = torch.randn(5, 6)
    params = [x, router.z_proj.weight, router.z_proj.bias, router.w_proj.weight, router.w_proj.bias]
    got = torch.autograd.grad((router.gate(x)[1] * g).sum(), params)
    p64 = [p.detach().double().requires_grad_() for p in params]
    x64, Wz, bz, Ww, bw = p64
    q = torch_oracle_q((x64 @ Wz.T + bz).view(5, 2, 3), x64 @ Ww.T + bw, 6, 0.5)
    want = torch.autograd.grad((q * g.double()).sum(), p64)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------- regularisers


def test_regularisers_hand_values():
    # n = 5 (m = 3), z = 0: every code gets 1/8, the 5 reachable ones hold 5/8 -> 1 / (5/8) = 1.6 per selector
    router = DSelectK(2, entropy=1.0, per_example=False).bind(8, 5)
    with torch.no_grad():
        router.z_logits.zero_()
    losses = router(torch.randn(3, 8)).losses
    assert float(losses["unreachable"].detach()) == pytest.approx(3.2, rel=1e-6)
    assert float(losses["entropy"].detach()) == pytest.approx(-10 * 0.125 * math.log(0.125 + 1e-6), rel=1e-6)
    with torch.no_grad():  # all mass on reachable codes (first bit 0): the penalty is exactly k
        router.z_logits[..., 0] = -1.0
    assert float(router(torch.randn(3, 8)).losses["unreachable"].detach()) == pytest.approx(2.0, rel=1e-6)
    assert "unreachable" not in DSelectK(2).bind(8, 4)(torch.randn(3, 8)).losses  # power of two: no penalty


def test_entropy_of_saturated_selectors_uses_the_epsilon():
    # one-hot selectors: 0 * log(1e-6) = 0, 1 * log(1 + 1e-6) ~ 1e-6: the entropy is -k log(1 + 1e-6)
    router = DSelectK(2, entropy=1.0, per_example=False).bind(8, 4)
    with torch.no_grad():
        router.z_logits.copy_(torch.tensor([[[0.5, -0.5], [-0.5, 0.5]]]))
    got = float(router(torch.randn(3, 8)).losses["entropy"].detach())
    assert got == pytest.approx(-2 * math.log(torch.tensor(1 + 1e-6, dtype=torch.float32).item()), rel=1e-6)


@pytest.mark.parametrize("n", [5, 6, 8])
def test_static_regularisers_once_per_gate_whatever_the_batch(n):
    router = DSelectK(3, gamma=0.4, entropy=0.37, per_example=False, num_tasks=2).bind(8, n)
    with torch.no_grad():
        router.z_logits.copy_((torch.rand(2, 3, math.ceil(math.log2(n))) - 0.5) * 0.6)
    for task in (0, 1):
        R, _ = ref_static(router, task)
        for T in (1, 256):
            losses = router(torch.randn(T, 8), task=task).losses
            assert float(losses["entropy"].detach()) == pytest.approx(0.37 * ref_entropy(R), rel=1e-5)
            if n == 8:
                assert "unreachable" not in losses
            else:
                assert float(losses["unreachable"].detach()) == pytest.approx(ref_unreachable(R), rel=1e-5)
    # tokens of both tasks in one call: each gate's terms once
    R = ref_static(router, 0)[0] + ref_static(router, 1)[0]
    losses = router(torch.randn(256, 8), task=torch.arange(256) % 2).losses
    assert float(losses["entropy"].detach()) == pytest.approx(0.37 * ref_entropy(R), rel=1e-5)
    if n != 8:
        assert float(losses["unreachable"].detach()) == pytest.approx(ref_unreachable(R), rel=1e-5)


def test_per_example_regularisers_sum_over_the_batch():
    router = DSelectK(2, gamma=0.8, entropy=0.5).bind(6, 6)
    with torch.no_grad():
        router.z_proj.weight.mul_(20)
    x = torch.randn(9, 6)
    Rs = [row for R, _ in ref_per_example(router, x) for row in R]
    losses = router(x).losses
    assert float(losses["entropy"].detach()) == pytest.approx(0.5 * ref_entropy(Rs), rel=1e-5)
    assert float(losses["unreachable"].detach()) == pytest.approx(ref_unreachable(Rs), rel=1e-5)
    router.eval()  # training only
    assert router(x).losses == {}


def test_regulariser_gradients_match_oracle():
    router = DSelectK(2, gamma=0.5, entropy=0.3, per_example=False).bind(8, 6)
    with torch.no_grad():
        router.z_logits.copy_(torch.tensor([[[0.1, -0.2, 0.05], [-0.15, 0.2, 0.12]]]))
    losses = router(torch.randn(4, 8)).losses
    got = torch.autograd.grad(losses["entropy"] + losses["unreachable"], router.z_logits)[0]
    z = router.z_logits.detach().double().clone().requires_grad_()
    one = torch.ones(1, 2, dtype=torch.float64)
    # r per selector from the oracle q of a gate with a single selector weight on it
    R = torch.stack([torch_oracle_q(z[:, s : s + 1], one[:, :1], 6, 0.5) for s in range(2)], dim=1)
    loss = 0.3 * -(R * torch.log(R + 1e-6)).sum() + (1 / R.sum(-1)).sum()
    want = torch.autograd.grad(loss, z)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------- initialisation


def _uniform_stats(v: torch.Tensor, bound: float) -> None:
    """``v`` looks like Uniform(-bound, bound): inside the bounds, reaching them, std bound / sqrt(3)."""
    v = v.detach().double().flatten()
    assert float(v.abs().max()) <= bound
    assert float(v.abs().max()) >= 0.99 * bound
    assert float(v.std()) == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert abs(float(v.mean())) < 4 * bound / math.sqrt(3 * v.numel())


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_static_initialisation(gamma):
    router = DSelectK(4, gamma=gamma, per_example=False, num_tasks=3000).bind(8, 16)
    _uniform_stats(router.z_logits, gamma / 100)
    _uniform_stats(router.w_logits, 0.05)
    r = router.gate(torch.zeros(3000, 8), task=torch.arange(3000))[0].detach()  # |S - 1/2| <= 3/(2 gamma) * gamma/100
    assert 0.485**4 <= float(r.min()) and float(r.max()) <= 0.515**4  # so r ~ uniform, 1/2^m each


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_per_example_initialisation(gamma):
    router = DSelectK(8, gamma=gamma).bind(1000, 16)  # z: 32 x 1000, w: 8 x 1000
    _uniform_stats(router.z_proj.weight, gamma / 100)
    _uniform_stats(router.w_proj.weight, 0.05)
    for b, bound in ((router.z_proj.bias, gamma / 100), (router.w_proj.bias, 0.05)):
        top = float(b.detach().abs().max())
        assert 0.5 * bound <= top <= bound


# ----------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("per_example", [True, False])
def test_saturated_gate_runs_only_k_experts_and_gradients_match(per_example):
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
    assert r.num_assignments == 12 and r.token.tolist() == [t for t in range(6) for _ in (0, 1)]
    assert r.expert.tolist() == [3, 5] * 6  # only the k chosen experts run
    # oracle: y_t = p_t0 FFN_5(x_t) + p_t1 FFN_3(x_t), p = softmax(w)
    f = [reference_experts(x, Routing(torch.arange(6), torch.full((6,), e), torch.ones(6), 6, 8), moe.experts)
         for e in (5, 3)]
    w = (router.w_proj(x) if per_example else router.w_logits.expand(6, 2)).detach()
    p = torch.softmax(w.double(), -1).float()
    torch.testing.assert_close(y, p[:, :1] * f[0] + p[:, 1:] * f[1], rtol=1e-5, atol=1e-6)
    y.sum().backward()
    z_grad = router.z_proj.bias.grad if per_example else router.z_logits.grad
    assert torch.all(z_grad == 0)  # saturated selectors freeze
    # dL/dw_s = p_s (A_s - sum_j p_j A_j), A_s = sum of the chosen expert's output
    A = torch.stack([fi.detach().sum(-1) for fi in f], dim=-1)  # [6, 2]
    dw = p * (A - (p * A).sum(-1, keepdim=True))
    if per_example:
        torch.testing.assert_close(router.w_proj.weight.grad, dw.T @ x, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(router.w_proj.bias.grad, dw.sum(0), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(router.w_logits.grad, dw.sum(0, keepdim=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("per_example", [True, False])
def test_dselect_layer_matches_independent_gate(per_example):
    moe = MoE(8, 8, 6, router=DSelectK(3, gamma=0.7, per_example=per_example)).double()
    router = moe.gate
    with torch.no_grad():
        if per_example:
            router.z_proj.weight.normal_(0, 0.1)
            router.w_proj.weight.normal_()
        else:
            router.z_logits.uniform_(-0.3, 0.3)
            router.w_logits.normal_()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert moe.last_routing.num_assignments == 5 * 6  # smooth band: every expert has weight

    def oracle(x):
        if per_example:
            z = (x @ router.z_proj.weight.T + router.z_proj.bias).view(5, 3, 3)
            w = x @ router.w_proj.weight.T + router.w_proj.bias
        else:
            z, w = router.z_logits.expand(5, 3, 3), router.w_logits.expand(5, 3)
        q = torch_oracle_q(z, w, 6, 0.7)
        everyone = Routing(torch.arange(5).repeat_interleave(6), torch.arange(6).repeat(5), q.flatten(), 5, 6)
        return reference_experts(x, everyone, moe.experts)

    y_ref = oracle(x)
    torch.testing.assert_close(y, y_ref, **F32)
    g = torch.randn_like(y)
    params = [x, *moe.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_nonzero_experts_counts_weights_above_threshold():
    router = DSelectK(2, per_example=False, num_tasks=2).bind(8, 8)
    with torch.no_grad():
        router.z_logits.copy_(torch.tensor([[[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]],  # two experts
                                            [[1.0, -1.0, 1.0], [1.0, -1.0, 0.0]]]))  # expert 5, 4 and 5 halves
        router.w_logits.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0]]))
    assert router.nonzero_experts().tolist() == [2, 2]
    assert router.nonzero_experts(threshold=0.3).tolist() == [2, 1]  # task 1: q = (.., 0.25, 0.75, ..)


def test_dselect_bad_arguments():
    with pytest.raises(ValueError, match="k=5 must be <= num_experts=4"):
        MoE(8, 8, 4, router=DSelectK(5))
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, inf\], got 0"):
        DSelectK(2, gamma=0)
    with pytest.raises(ValueError, match="num_tasks is for the static form"):
        DSelectK(2, num_tasks=2)


# ----------------------------------------------------------------------------------- multi-gate MoE


@pytest.mark.parametrize("gates", [["softmax", "softmax"], [TopK(2), "dselect"], [DSelectK(2, per_example=False), TopK(1)]])
def test_multigate_matches_naive(gates):
    model = MultiGateMoE(8, 4, 8, gates, task_out=[1, 3]).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    mixtures = model.mixtures(x)
    for t, r in enumerate(model.last_routing):
        torch.testing.assert_close(mixtures[t], reference_experts(x, r, model.experts))
        g = model.gates[t]
        if isinstance(g, DSelectK):  # the routing holds the oracle's selection weights
            want = [q for _, q in ref_per_example(g, x)] if g.per_example else [ref_static(g, 0)[1]] * 6
            torch.testing.assert_close(dense(r), t64(want), **F32)
    outs = model(x)
    for o, tower, m in zip(outs, model.towers, mixtures, strict=True):
        torch.testing.assert_close(o, tower(m))
    assert [o.shape for o in outs] == [(6, 1), (6, 3)]


def test_multigate_static_regularisers_once_per_task_gate():
    gates = [DSelectK(2, gamma=0.5, entropy=0.2, per_example=False) for _ in range(3)]
    model = MultiGateMoE(8, 6, 8, gates)
    with torch.no_grad():
        for g in model.gates:
            g.z_logits.uniform_(-0.2, 0.2)
    want = sum(0.2 * ref_entropy(R) + ref_unreachable(R) for R in (ref_static(g, 0)[0] for g in model.gates))
    for T in (1, 64):
        model(torch.randn(T, 8))
        assert float(aux_loss(model).detach()) == pytest.approx(want, rel=1e-5)
