"""torch.compile of moekit.MoE (inductor): the compiled layer equals the eager one in its output, its
input gradient and every parameter gradient (auxiliary losses included), for each expert backend and
the main routers; it does not recompile when only the routing changes; its graph breaks are the ones
the layer's docstring states. Tiny fp32 shapes: compiling is slow on small machines."""

import contextlib
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import moekit
from moekit import MoE
from moekit.experts import available_backends
from moekit.routers import DSelectK, DynamicK, ExpertChoice, SigmoidSTE, TopK

D, F, E, T = 16, 32, 4, 12
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own layer from scratch (no cache hit, no recompile limit reached)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _step(moe, x, g, context, autocast=False):
    """Output and gradients of ``sum(moe(x) * g) + aux_loss`` w.r.t. the input and every parameter; the
    forward optionally under bf16 autocast (the backward outside it, as torch.amp recommends)."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        y = moe(x, **context)
    params = [p for p in moe.parameters() if p.requires_grad]
    loss = (y * g).sum() + moekit.aux_loss(moe)
    return y.detach(), torch.autograd.grad(loss, [x, *params], allow_unused=True)


def _assert_compiled_equals_eager(moe, context=None, calls=1):
    """``calls`` training steps on fresh inputs of one shape, through ``torch.compile(moe)`` and through an
    eager twin (same weights and state); returns the number of graphs compiled after the first step."""
    context = context or {}
    eager = copy.deepcopy(moe)
    compiled = torch.compile(moe)
    names = ["x"] + [n for n, p in moe.named_parameters() if p.requires_grad]
    graphs = []
    for _ in range(calls):
        x, g = torch.randn(T, D), torch.randn(T, D)
        y_c, grads_c = _step(compiled, x, g, context)
        y_e, grads_e = _step(eager, x, g, context)
        torch.testing.assert_close(y_c, y_e, **TOL)
        for name, a, b in zip(names, grads_c, grads_e):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1  # it was compiled, not silently run eagerly
    return graphs


@pytest.mark.parametrize("backend", available_backends())
def test_compiled_topk_layer_equals_eager_and_compiles_once(backend):
    """Bias, a gated shared expert and the balance/z losses on: every kind of parameter gets a gradient.
    New inputs (hence new routings and split sizes) reuse the compiled graphs."""
    moe = MoE(D, F, E, router=TopK(2, balance=0.1, z_loss=0.01), bias=True, shared_d_ff=F, shared_gate=True,
              backend=backend).train()
    graphs = _assert_compiled_equals_eager(moe, calls=3)
    assert graphs[-1] == graphs[0]
    # the compile wrapper forwards last_routing to the layer: its losses count once, under the layer's name
    assert set(moekit.routing_stats(torch.compile(moe))) == {""}


@pytest.mark.parametrize("router", ["expert_choice", "sigmoid_ste", "dselect", "dynamic_k"])
def test_compiled_layer_with_other_routers_equals_eager(router):
    make = {
        "expert_choice": lambda: ExpertChoice(2.0, z_loss=0.01),
        "sigmoid_ste": lambda: SigmoidSTE(tau=0.5, sparsity=0.1),
        "dselect": lambda: DSelectK(k=2, entropy=1e-3),
        "dynamic_k": lambda: DynamicK(1, 3, budget=2.0),
    }
    context = {"importance": torch.rand(T) + 0.1} if router == "dynamic_k" else {}
    # two steps for DynamicK: its running scale, updated in the first, sets the second's K
    _assert_compiled_equals_eager(MoE(D, F, E, router=make[router]()).train(), context,
                                  calls=2 if router == "dynamic_k" else 1)


def test_compiled_inference_equals_eager_and_checks_finite_inside_the_graph():
    """Eval mode without autograd (the experts' output is scaled in place); a NaN input still fails loudly."""
    moe = MoE(D, F, E, router=TopK(2)).eval()
    compiled = torch.compile(moe)
    x = torch.randn(2, T // 2, D)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), moe(x), **TOL)
        x[1, 2, 3] = float("nan")
        with pytest.raises(RuntimeError, match="MoE: x contains NaN or inf"):
            compiled(x)


def _breaks(moe, **context):
    return torch._dynamo.explain(moe)(torch.randn(T, D), **context).graph_break_count


def test_graph_breaks_are_the_documented_ones():
    """The MoE docstring: no break with grouped_mm and a router of fixed assignment count, one with the
    segment loop (it needs the split sizes on the host), one for DynamicK (it runs eagerly)."""
    for train in (True, False):
        assert _breaks(MoE(D, F, E, router=TopK(2), backend="grouped_mm").train(train)) == 0
        assert _breaks(MoE(D, F, E, router=TopK(2), backend="loop").train(train)) == 1
        assert _breaks(MoE(D, F, E, router=ExpertChoice(), backend="grouped_mm").train(train)) == 0
    assert _breaks(MoE(D, F, E, router=SigmoidSTE(), backend="grouped_mm").train()) == 0
    assert _breaks(MoE(D, F, E, router=DynamicK(1, 3), backend="grouped_mm"), importance=torch.rand(T)) == 1
    # a data-dependent number of assignments (torch.nonzero, capacity masks) splits inside the router
    assert _breaks(MoE(D, F, E, router=DSelectK(2), backend="grouped_mm")) > 0
    assert _breaks(MoE(D, F, E, router=TopK(2, capacity_factor=1.0), backend="grouped_mm")) > 0
    assert "one graph break" in MoE.__doc__ and "no graph break" in MoE.__doc__


def test_compiled_layer_under_autocast_equals_eager():
    """bf16 autocast (the shared expert's linears run in bf16, routers and experts in fp32), with torch's
    compiled backward outside autocast as in eager (``backward_pass_autocast="off"``)."""
    moe = MoE(D, F, E, router=TopK(2), shared_d_ff=F).train()
    eager = copy.deepcopy(moe)
    compiled = torch.compile(moe)
    x, g = torch.randn(T, D), torch.randn(T, D)
    with torch._functorch.config.patch(backward_pass_autocast="off"):
        y_c, grads_c = _step(compiled, x, g, {}, autocast=True)
    y_e, grads_e = _step(eager, x, g, {}, autocast=True)
    assert y_c.dtype == y_e.dtype
    torch.testing.assert_close(y_c, y_e, atol=1e-2, rtol=1e-2)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layer_on_cuda_equals_eager(dtype):
    moe = MoE(64, 128, 8, router=TopK(2)).cuda().to(dtype).train()
    eager = copy.deepcopy(moe)
    compiled = torch.compile(moe)
    x, g = torch.randn(32, 64, device="cuda", dtype=dtype), torch.randn(32, 64, device="cuda", dtype=dtype)
    y_c, grads_c = _step(compiled, x, g, {})
    y_e, grads_e = _step(eager, x, g, {})
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y_c, y_e, **tol)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, **tol)
