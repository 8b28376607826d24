"""moekit.MoE against the naive reference: outputs and gradients, every backend, edge cases."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit
from moekit import MoE, Routing
from moekit.routers import ExpertChoice, TopK
from tests.reference import reference_moe

BACKENDS = ["loop", "grouped_mm"]


def _grads(module, x, y, g):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(y, [x, *params], g, allow_unused=True)


def _assert_same(moe, x, *, routing=None, atol, rtol):
    """moe(x) and the reference agree in output and in gradients of x, router and experts."""
    x = x.detach().requires_grad_(True)
    y = moe(x, routing=routing)
    r = moe.last_routing
    y_ref, _ = reference_moe(moe, x, routing=r)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    g = torch.randn_like(y)
    got = _grads(moe, x, y, g)
    # the reference must see the same routing graph: recompute it through the router
    x2 = x.detach().requires_grad_(True)
    y_ref2, _ = reference_moe(moe, x2, routing=None if routing is None else routing)
    want = _grads(moe, x2, y_ref2, g)
    names = ["x"] + [n for n, p in moe.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, got, want):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad of {name}: {m}")


def _skewed_input(T, d, skew, dtype):
    x = torch.randn(T, d, dtype=dtype)
    u = torch.ones(d, dtype=dtype) / d**0.5
    return x + skew * u, u


@given(
    T=st.integers(0, 24),
    d=st.sampled_from([4, 8, 12]),
    d_ff=st.sampled_from([4, 8]),
    E=st.integers(1, 9),
    k_frac=st.floats(0.0, 1.0),
    capacity=st.one_of(st.none(), st.floats(0.25, 2.0)),
    skew=st.sampled_from([0.0, 2.0, 8.0]),
    renorm=st.booleans(),
    activation=st.sampled_from(["swiglu", "geglu", "gelu", "gelu_tanh", "relu", "silu"]),
    bias=st.booleans(),
    shared=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_topk_layer_matches_reference(T, d, d_ff, E, k_frac, capacity, skew, renorm, activation, bias, shared, backend, seed):
    torch.manual_seed(seed)
    k = 1 + int(k_frac * (E - 1))
    dtype = torch.float64 if backend == "loop" else torch.float32
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    moe = MoE(d, d_ff, E, router=TopK(k, renormalize=renorm, capacity_factor=capacity), activation=activation,
              bias=bias, shared_d_ff=d_ff if shared else None, shared_gate=shared, backend=backend).to(dtype)
    x, u = _skewed_input(T, d, skew, dtype)
    with torch.no_grad():
        moe.gate.weight[0] += skew * u.float()
        if bias:
            for p in (moe.experts.first_bias, moe.experts.down_proj_bias):
                p.normal_()
    _assert_same(moe, x, atol=tol["atol"], rtol=tol["rtol"])


@given(
    T=st.integers(0, 20),
    E=st.integers(1, 8),
    cf=st.floats(0.25, 3.0),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_expert_choice_layer_matches_reference(T, E, cf, backend, seed):
    torch.manual_seed(seed)
    dtype = torch.float64 if backend == "loop" else torch.float32
    moe = MoE(8, 8, E, router=ExpertChoice(cf), backend=backend).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    _assert_same(moe, torch.randn(T, 8, dtype=dtype), atol=tol, rtol=tol)


@given(
    T=st.integers(1, 16),
    E=st.integers(1, 6),
    n_per_token=st.integers(0, 4),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_ragged_precomputed_routing_matches_reference(T, E, n_per_token, backend, seed):
    """Arbitrary ragged routings (dynamic-k, duplicates, unsorted) through moe(x, routing=r)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if backend == "loop" else torch.float32
    moe = MoE(8, 4, E, router=TopK(1), backend=backend).to(dtype)
    counts = torch.randint(0, n_per_token + 1, (T,), generator=g)
    token = torch.repeat_interleave(torch.arange(T), counts)
    perm = torch.randperm(token.numel(), generator=g)
    token = token[perm]
    expert = torch.randint(0, E, (token.numel(),), generator=g)
    weight = torch.rand(token.numel(), generator=g, dtype=dtype).requires_grad_(True)
    r = Routing(token=token, expert=expert, weight=weight, num_tokens=T, num_experts=E)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    _assert_same(moe, torch.randn(T, 8, dtype=dtype), routing=r, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    ["T=0", "T=1", "E=1", "k=E", "all-to-one", "empty-experts", "all-dropped"],
)
def test_edge_cases(case, backend):
    d, F, E, k = 8, 8, 4, 2
    T = 6
    router = TopK(k)
    routing = None
    if case == "T=0":
        T = 0
    elif case == "T=1":
        T = 1
    elif case == "E=1":
        E, router = 1, TopK(1)
    elif case == "k=E":
        router = TopK(E)
    elif case == "all-dropped":
        router = TopK(1, capacity_factor=1e-9)
    moe = MoE(d, F, E, router=router, backend=backend)
    x = torch.randn(2, T // 2 if T > 1 else T, d) if T != 1 else torch.randn(1, d)
    if case == "all-to-one":
        n = x.reshape(-1, d).shape[0]
        routing = Routing(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.rand(n), n, E)
    elif case == "empty-experts":
        n = x.reshape(-1, d).shape[0]
        routing = Routing(torch.arange(n), (torch.arange(n) % 2) * 2, torch.rand(n), n, E)  # experts 1, 3 idle
    _assert_same(moe, x, routing=routing, atol=2e-5, rtol=2e-5)
    y = moe(x, routing=routing)
    assert y.shape == x.shape
    if case == "all-dropped":
        stats = moekit.routing_stats(moe)[""]
        assert stats.mean_experts_per_token < 1.0 and stats.dropped_fraction > 0


def test_precomputed_routing_replays_exactly():
    moe = MoE(16, 32, 8, router=TopK(2)).eval()
    x = torch.randn(3, 5, 16)
    y = moe(x)
    r = moe.last_routing.detach()
    torch.testing.assert_close(moe(x, routing=r), y)


def test_aux_loss_and_stats_cover_every_layer():
    model = torch.nn.Sequential(MoE(8, 8, 4, router=TopK(2, balance=0.1, z_loss=0.01)), MoE(8, 8, 4, router=TopK(1)))
    model.train()
    x = torch.randn(32, 8)
    y = model(x)
    total = moekit.aux_loss(model)
    parts = [v for m in model for v in m.last_routing.losses.values()]
    assert len(parts) == 4
    torch.testing.assert_close(total, sum(parts))
    (y.sum() + total).backward()
    assert model[0].gate.weight.grad is not None
    stats = moekit.routing_stats(model)
    assert set(stats) == {"0", "1"}
    assert sum(stats["0"].tokens_per_expert) == 64 and stats["0"].mean_experts_per_token == 2.0
    assert stats["1"].mean_experts_per_token == 1.0
    assert 0 <= stats["0"].router_entropy <= torch.log(torch.tensor(4.0)).item() + 1e-6
    model.eval()
    model(x)
    assert float(moekit.aux_loss(model)) == 0.0  # losses are a training-time quantity


def test_aux_loss_of_model_without_moe_is_zero():
    assert float(moekit.aux_loss(torch.nn.Linear(2, 2))) == 0.0


def test_input_shapes_are_preserved():
    moe = MoE(8, 8, 4)
    for shape in [(8,), (3, 8), (2, 3, 8), (2, 1, 3, 8)]:
        assert moe(torch.randn(*shape)).shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_assignment_at_all_gives_the_experts_zero_gradients(backend):
    """A layer whose experts get no row (all dropped, or an expert-parallel rank nobody sends to)
    still gives every expert weight a zero gradient, as a batch with tokens gives its idle experts,
    so an optimizer treats the step alike (AdamW's decay and moments)."""
    moe = MoE(8, 8, 4, backend=backend)
    x = torch.randn(3, 8, requires_grad=True)
    y = moe(x, routing=Routing(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), 3, 4))
    assert torch.equal(y, torch.zeros(3, 8))
    y.sum().backward()
    for name, p in moe.experts.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
