"""MC-MoE: quantized experts against a naive MoE on the dequantized weights, the layer-output errors
against re-running the layer, the exact bit allocation against enumeration, calibration statistics
against a loop over the router's softmax, ODP's median threshold; GPTQ experts against GPTQ on the
Hessians of the tokens routed to them, attention packed at 4 bits against its hand-counted bytes."""

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from moekit import MoE
from moekit.compress import compress
from moekit.compress.gptq import gptq
from moekit.compress.mcmoe import (
    MCMoE,
    allocate_bits,
    allocation_costs,
    calibrate_layers,
    calibrate_odp,
    expert_errors,
    load_compressed,
    mcmoe,
    save_compressed,
    with_odp,
)
from moekit.compress.quant import dequantize, quantize, quantized_bytes
from moekit.compress.quantized import QuantizedExperts, QuantizedLinear
from moekit.compress.surgery import dedup_bytes
from moekit.experts import get_activation
from moekit.models import GPT, GPTConfig
from moekit.routers.odp import ODP


class Two(nn.Module):
    """Two MoE layers in a row (D = 32, F = 64, E = 6, top-2)."""

    def __init__(self, activation="swiglu", bias=False):
        super().__init__()
        self.a = MoE(32, 64, 6, router="topk", activation=activation, bias=bias)
        self.b = MoE(32, 64, 6, router="topk", activation=activation, bias=bias)
        if bias:
            for m in (self.a, self.b):
                for p in (m.experts.first_bias, m.experts.down_proj_bias):
                    nn.init.normal_(p, std=0.1)

    def forward(self, x):
        return self.b(self.a(x))


def _naive(moe, x, bits, group):
    """Per token, the sum over its routed experts of weight * FFN with dequantized weights."""
    ex, act = moe.experts, get_activation(moe.experts.activation)
    r = moe.gate(x)
    out = torch.zeros_like(x)
    for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist()):
        w1 = dequantize(quantize(ex.first_proj[e], bits[e], group))
        w2 = dequantize(quantize(ex.down_proj[e], bits[e], group))
        h = w1 @ x[t] + (0 if ex.first_bias is None else ex.first_bias[e])
        if act.gated:
            g, u = h.chunk(2)
            a = act.fn(g) * u
        else:
            a = act.fn(h)
        out[t] += w * (w2 @ a + (0 if ex.down_proj_bias is None else ex.down_proj_bias[e]))
    return out


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_quantized_experts_compute_the_dequantized_moe(activation, bias):
    torch.manual_seed(0)
    moe = Two(activation, bias).a.eval()
    bits, group = [1, 2, 3, 4, 8, 3], 16
    q = copy.deepcopy(moe)
    q.experts = QuantizedExperts.from_experts(moe.experts, bits, group)
    x = torch.randn(20, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), _naive(moe, x, bits, group), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(q(x), moe(x), atol=1e-3)  # it really is quantized
    first = 2 * 64 if activation == "swiglu" else 64
    want = sum(quantized_bytes(s, b, group) for b in bits for s in [(first, 32), (32, 64)])
    want += 6 * (first + 32) * 4 if bias else 0  # fp32 biases
    assert q.experts.nbytes == want
    assert not any(t.is_floating_point() for t in q.experts.buffers())


def test_quantized_experts_reload_from_a_state_dict_and_follow_the_input_dtype():
    torch.manual_seed(1)
    moe = Two().a.eval()
    qe = QuantizedExperts.from_experts(moe.experts, [2, 3, 1, 3, 2, 4], 32)
    empty = QuantizedExperts(6, 32, 64, [2, 3, 1, 3, 2, 4], 32)
    empty.load_state_dict(qe.state_dict())
    a, b = copy.deepcopy(moe), copy.deepcopy(moe)
    a.experts, b.experts = qe, empty
    x = torch.randn(10, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        y64 = a.double()(x.double())
    assert y64.dtype == torch.float64 and torch.allclose(y64.float(), a.float()(x), atol=1e-5)
    with pytest.raises(ValueError, match="one of"):
        QuantizedExperts(6, 32, 64, [2, 3], 32)


def test_expert_errors_equal_rerunning_the_layer_with_one_expert_quantized():
    torch.manual_seed(2)
    moe = Two().a.eval()
    x = torch.randn(40, 32)
    eps = expert_errors(moe, x, [1, 2, 3], group=16)
    with torch.no_grad():
        y = moe(x)
        for i, (j, bits) in itertools.product(range(6), enumerate([1, 2, 3])):
            m = copy.deepcopy(moe)
            m.experts.gate_up_proj[i] = dequantize(quantize(moe.experts.gate_up_proj[i], bits, 16))
            m.experts.down_proj[i] = dequantize(quantize(moe.experts.down_proj[i], bits, 16))
            assert float(eps[i, j]) == pytest.approx(float(torch.linalg.norm(m(x) - y)), rel=1e-4, abs=1e-6)
    assert bool((eps[:, 0] > eps[:, 2]).all())


def _brute(cost, widths, total, protect):
    best, best_c = None, float("inf")
    feasible_protected = any(sum(c) == total and max(widths) in c and sorted(widths)[-2] in c
                             for c in itertools.product(widths, repeat=cost.shape[0]))
    for choice in itertools.product(range(len(widths)), repeat=cost.shape[0]):
        ws = [widths[j] for j in choice]
        if sum(ws) != total:
            continue
        if protect and feasible_protected and not (max(widths) in ws and sorted(widths)[-2] in ws):
            continue
        c = sum(float(cost[i, j]) for i, j in enumerate(choice))
        if c < best_c - 1e-12:
            best, best_c = ws, c
    return best, best_c


@pytest.mark.parametrize("E", [4, 5])
@pytest.mark.parametrize("widths", [(1, 2, 3), (2, 4, 8)])
def test_allocation_is_the_exact_optimum(E, widths):
    g = torch.Generator().manual_seed(E)
    for trial in range(6):
        cost = torch.rand(E, len(widths), generator=g, dtype=torch.float64)
        cost[:, -1] *= 0.1 * trial  # trial 0: the highest width is free, so protection binds on the rest
        for total in range(min(widths) * E, max(widths) * E + 1):
            for protect in (True, False):
                want, want_c = _brute(cost, widths, total, protect)
                if want is None:
                    continue
                got = allocate_bits(cost, widths, total, protect)
                got_c = sum(float(cost[i, widths.index(w)]) for i, w in enumerate(got))
                assert sum(got) == total and got_c == pytest.approx(want_c, abs=1e-12), (total, protect)
                if protect and want is not None and max(widths) in want and sorted(widths)[-2] in want:
                    assert max(widths) in got and sorted(widths)[-2] in got


def test_allocation_protects_the_top_two_widths():
    cost = torch.tensor([[0.0, 5.0, 5.0]] * 4, dtype=torch.float64)  # 1 bit is free for everyone
    assert sorted(allocate_bits(cost, (1, 2, 3), 7)) == [1, 1, 2, 3]
    cost = torch.tensor([[5.0, 0.0, 9.0]] * 4, dtype=torch.float64)  # 2 bits free, 3 bits dear
    assert allocate_bits(cost, (1, 2, 3), 8, protect=False) == [2, 2, 2, 2]
    assert sorted(allocate_bits(cost, (1, 2, 3), 8)) == [1, 2, 2, 3]
    assert allocate_bits(cost, (1, 2, 3), 4) == [1, 1, 1, 1]  # infeasible with protection: dropped
    with pytest.raises(ValueError, match="budget of 13 bits"):
        allocate_bits(cost, (1, 2, 3), 13)


def test_calibration_statistics_match_a_loop_over_the_softmax():
    torch.manual_seed(3)
    model = Two()
    xs = [torch.randn(7, 32), torch.randn(5, 32)]
    calib = calibrate_layers(model, xs)
    hits, mass = torch.zeros(6), torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for x in xs:
            p = torch.softmax(x @ model.a.gate.weight.t(), -1).double()
            for row in p:
                for e in torch.topk(row, 2).indices.tolist():
                    hits[e] += 1
                    mass[e] += row[e]
    c = calib["a"]
    assert c.num_tokens == 12 and torch.equal(c.x, torch.cat(xs))
    assert torch.equal(c.phi, hits.double() / 12) and torch.allclose(c.w, mass / 12, atol=1e-6)
    assert torch.allclose(calib["b"].x, model.a(torch.cat(xs)).detach(), atol=1e-6)


def test_costs_of_each_allocation():
    calib = calibrate_layers(Two(), [torch.randn(4, 32)])["a"]
    eps = torch.rand(6, 3, dtype=torch.float64)
    pmq = allocation_costs("pmq", calib, eps, (1, 2, 3), 2.0, alpha=1.0, beta=1.5, gamma=2.0)
    for i in range(6):
        for j in range(3):
            want = float(calib.phi[i]) * float(calib.w[i]) ** 1.5 * float(eps[i, j]) ** 2
            assert float(pmq[i, j]) == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert torch.allclose(allocation_costs("error", calib, eps, (1, 2, 3), 2.0, gamma=3.0), eps ** 3)
    freq = allocation_costs("frequency", calib, eps, (1, 2, 3), 2.0)
    assert torch.allclose(freq, calib.phi.unsqueeze(1) * torch.tensor([1 / 4, 1 / 16, 1 / 64], dtype=torch.float64))
    uni = allocation_costs("uniform", calib, eps, (1, 2, 3), 2.0)
    assert allocate_bits(uni, (1, 2, 3), 12, protect=False) == [2] * 6
    with pytest.raises(ValueError, match="allocation must be one of"):
        allocation_costs("nope", calib, eps, (1, 2, 3), 2.0)


@pytest.mark.parametrize("allocation", ["pmq", "error", "frequency", "uniform", "random"])
def test_mcmoe_meets_the_budget_and_computes_the_dequantized_model(allocation):
    torch.manual_seed(4)
    model = Two().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(30, 32)
    method = mcmoe(model, [x], bits=2.5, group=16, allocation=allocation, quantizer="rtn")
    assert set(method.allocations) == {"a", "b"}
    for name in ("a", "b"):
        widths = method.allocations[name]
        assert sum(widths) == 15 and getattr(model, name).experts.bits == widths
        if allocation != "uniform":
            assert 3 in widths and 2 in widths
    if allocation == "uniform":
        assert sorted(method.allocations["a"]) == [2, 2, 2, 3, 3, 3]
    with torch.no_grad():
        h = _naive(ref.a, x, method.allocations["a"], 16)
        torch.testing.assert_close(model(x), _naive(ref.b, h, method.allocations["b"], 16), atol=1e-5, rtol=1e-5)


def test_pmq_puts_the_bits_where_the_output_changes_most():
    torch.manual_seed(5)
    model = Two().eval()
    with torch.no_grad():
        model.a.experts.gate_up_proj[4] *= 20  # expert 4's output dwarfs the others'
    x = torch.randn(200, 32)
    method = mcmoe(model, [x], bits=2.0, group=16)
    assert method.allocations["a"][4] == 3


def test_the_registered_method_runs_in_the_driver_by_name():
    torch.manual_seed(6)
    model = Two()
    ref = copy.deepcopy(model)
    x = torch.randn(16, 32)
    compress(model, "mc-moe", iter([x]), bits=2.0, group=16)  # the driver calibrates it (a one-pass iterator)
    assert isinstance(model.a.experts, QuantizedExperts) and sum(model.b.experts.bits) == 12
    m = mcmoe(ref, [x], bits=2.0, group=16)
    assert [model.a.experts.bits, model.b.experts.bits] == [m.allocations["a"], m.allocations["b"]]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not calibrated"):
        MCMoE(bits=2.0, group=16).compress_layer(Two().a)
    with pytest.raises(ValueError, match="bits=4"):
        MCMoE(bits=4)
    with pytest.raises(ValueError, match="itself a MoE layer"):
        mcmoe(model.a, [x])


def test_odp_threshold_is_the_calibration_median():
    torch.manual_seed(7)
    model = Two()
    xs = [torch.randn(9, 32), torch.randn(8, 32)]
    assert with_odp(model, protect=0.0) == ["a", "b"]
    mus = calibrate_odp(model, xs)
    ratios = []
    with torch.no_grad():
        for x in xs:
            p = torch.softmax(x @ model.a.gate.inner.weight.t(), -1)
            top = torch.topk(p, 2).values
            ratios += (top[:, 1] / top[:, 0]).tolist()
    assert mus["a"] == pytest.approx(float(np.median(ratios)), rel=1e-6)
    assert float(model.a.gate.mu) == pytest.approx(mus["a"])
    with torch.no_grad():
        model(torch.cat(xs))
    kept = model.a.last_routing.k_per_token
    assert int((kept == 1).sum()) == sum(r < mus["a"] for r in ratios)
    assert isinstance(model.b.gate, ODP)


def test_a_compressed_gpt_reloads_to_identical_outputs(tmp_path):
    torch.manual_seed(8)
    cfg = GPTConfig(vocab_size=31, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, d_ff=64).with_moe(4, 2)
    model = GPT(cfg).eval()
    batches = [torch.randint(0, 31, (2, 12)) for _ in range(2)]
    method = mcmoe(model, batches, bits=2.5, group=16)
    with_odp(model, protect=0.25)
    mus = calibrate_odp(model, batches)
    assert set(method.allocations) == set(mus) == {"blocks.0.ffn", "blocks.1.ffn"}
    ids = torch.randint(0, 31, (2, 12))
    with torch.no_grad():
        want = model(ids)
    save_compressed(model, tmp_path / "m")
    back = load_compressed(tmp_path / "m").eval()
    assert back.blocks[1].ffn.experts.bits == method.allocations["blocks.1.ffn"]
    assert float(back.blocks[0].ffn.gate.mu) == pytest.approx(mus["blocks.0.ffn"])
    with torch.no_grad():
        assert torch.equal(back(ids), want)
    GPT(cfg).save(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="mcmoe.json: missing; not a model saved by save_compressed"):
        load_compressed(tmp_path / "plain")
    with pytest.raises(ValueError, match="no quantized experts"):
        save_compressed(GPT(cfg), tmp_path / "x")


def _hessian(x):
    x = x.double()
    return 2 * x.t() @ x / x.shape[0]


def test_quantized_linear_computes_x_times_the_dequantized_weight():
    torch.manual_seed(9)
    lin = nn.Linear(32, 24)
    nn.init.normal_(lin.bias, std=0.1)
    x = torch.randn(5, 32)
    H = _hessian(torch.randn(40, 32) @ torch.randn(32, 32))
    for hessian, q in ((None, quantize(lin.weight, 3, 16)), (H, gptq(lin.weight, H, 3, 16))):
        ql = QuantizedLinear.from_linear(lin, 3, 16, hessian)
        with torch.no_grad():
            want = x @ dequantize(q).t() + lin.bias
            torch.testing.assert_close(ql(x), want, atol=1e-6, rtol=1e-6)
            assert ql(x.double()).dtype == torch.float64
        assert torch.equal(ql.weight_codes, q.codes)
        assert ql.nbytes == quantized_bytes((24, 32), 3, 16) + 24 * 4 and dedup_bytes(ql) == ql.nbytes
        assert not any(t.is_floating_point() for t in ql.buffers())
        empty = QuantizedLinear(32, 24, 3, 16, bias=True)
        empty.load_state_dict(ql.state_dict())
        assert torch.equal(empty(x), ql(x))
    with pytest.raises(ValueError, match="multiple of group=64"):
        QuantizedLinear(32, 8, 4)


def _routed_hessians(moe, x):
    """Per expert: the Hessians of its first projection's inputs (the tokens whose top-2 of the router's
    softmax holds it) and of its down projection's inputs (silu(gate) * up on those tokens), or None."""
    p = torch.softmax(x @ moe.gate.weight.t(), -1)
    top = torch.topk(p, 2).indices
    out = []
    for e in range(moe.num_experts):
        xe = x[(top == e).any(1)]
        if len(xe) == 0:
            out.append(None)
            continue
        g, u = (xe @ moe.experts.gate_up_proj[e].t()).chunk(2, -1)
        out.append((_hessian(xe), _hessian(torch.nn.functional.silu(g) * u)))
    return out


def test_gptq_experts_use_the_hessians_of_their_routed_tokens():
    torch.manual_seed(10)
    model = Two().eval()
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        model.a.gate.weight[5] = -8 * u  # no calibration token picks expert 5 of layer a
    ref = copy.deepcopy(model)
    x = 0.3 * torch.randn(60, 32) + 2 * u
    method = mcmoe(model, [x], bits=2.5, group=16)  # GPTQ is the default
    with torch.no_grad():
        inputs = {"a": x, "b": ref.a(x)}  # layer b calibrates on the float model's layer a
    for name, layer_x in inputs.items():
        moe, experts = getattr(ref, name), getattr(model, name).experts.experts
        hs = _routed_hessians(moe, layer_x)
        assert (hs[5] is None) == (name == "a")
        for e, bits in enumerate(method.allocations[name]):
            for part, w, k in (("first", moe.experts.gate_up_proj[e], 0), ("down", moe.experts.down_proj[e], 1)):
                want = quantize(w, bits, 16) if hs[e] is None else gptq(w, hs[e][k], bits, 16)
                assert torch.equal(experts[e].quantized(part).codes, want.codes), (name, e, part)
                assert torch.equal(experts[e].quantized(part).scale, want.scale)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        MCMoE(quantizer="awq")


def test_gptq_experts_change_the_layer_output_less_than_round_to_nearest():
    torch.manual_seed(11)
    model = Two().eval()
    x = torch.randn(200, 32) @ torch.randn(32, 32) / 4  # correlated features
    errs = {}
    for quantizer in ("rtn", "gptq"):
        m = copy.deepcopy(model)
        mcmoe(m, [x], bits=2.0, group=16, allocation="uniform", quantizer=quantizer)
        assert m.a.experts.bits == [2] * 6
        with torch.no_grad():
            errs[quantizer] = float((m(x) - model(x)).norm())
    assert errs["gptq"] < 0.8 * errs["rtn"], errs  # measured 0.67 (0.57-0.67 over seeds 11-13)


def test_with_odp_on_chosen_layers():
    assert with_odp(Two(), layers=[1]) == ["b"]
    model = Two()
    assert with_odp(model, layers="a") == ["a"] and not isinstance(model.b.gate, ODP)
    with pytest.raises(ValueError, match="neither the name nor the index"):
        with_odp(Two(), layers=[2])
    with pytest.raises(ValueError, match="neither the name nor the index"):
        with_odp(Two(), layers="c")
    model = Two()
    model.a.gate.k = 1
    with pytest.raises(ValueError, match="layer 'a' is not routed by a dropless top-2"):
        with_odp(model, layers=[0, 1])
    assert with_odp(model) == ["b"]


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_attention_at_4_bits_counts_packed_bytes_and_reloads_to_identical_outputs(tmp_path, quantizer):
    torch.manual_seed(12)
    cfg = GPTConfig(vocab_size=31, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, d_ff=64).with_moe(4, 2)
    model = GPT(cfg).eval()
    ref = copy.deepcopy(model)
    batches = [torch.randint(0, 31, (2, 12)) for _ in range(2)]
    seen = {}
    hooks = [lin.register_forward_hook(lambda _m, a, _o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, 32)))
             for n, lin in ref.named_modules() if n.endswith(("attn.qkv", "attn.proj"))]
    with torch.no_grad():
        for b in batches:
            ref(b)
    for h in hooks:
        h.remove()
    plain_model = copy.deepcopy(model)
    plain = mcmoe(plain_model, batches, bits=2.5, group=16, quantizer=quantizer)
    method = mcmoe(model, iter(batches), bits=2.5, group=16, quantizer=quantizer, attention_bits=4)
    assert method.allocations == plain.allocations and sorted(method.attention) == sorted(seen)
    # per layer: qkv [96, 32] -> 1536 code bytes + 96 x 2 groups x (scale + zero) = 2304; proj [32, 32] -> 512 + 256
    model_bytes = dedup_bytes(model)
    assert model_bytes == dedup_bytes(plain_model) - 2 * 4 * (96 * 32 + 32 * 32) + 2 * (2304 + 768)
    for name in seen:
        lin, ql = ref.get_submodule(name), model.get_submodule(name)
        H = _hessian(torch.cat(seen[name]))  # the float model's inputs
        want = quantize(lin.weight, 4, 16) if quantizer == "rtn" else gptq(lin.weight, H, 4, 16)
        assert isinstance(ql, QuantizedLinear) and torch.equal(ql.weight_codes, want.codes), name
    with_odp(model, protect=0.25, layers=[1])
    calibrate_odp(model, batches)
    ids = torch.randint(0, 31, (2, 12))
    with torch.no_grad():
        want = model(ids)
        assert not torch.allclose(want, ref(ids), atol=1e-3)
    save_compressed(model, tmp_path / "m")
    back = load_compressed(tmp_path / "m").eval()
    assert isinstance(back.blocks[0].attn.proj, QuantizedLinear) and back.blocks[0].attn.qkv.bits == 4
    assert isinstance(back.blocks[1].ffn.gate, ODP) and not isinstance(back.blocks[0].ffn.gate, ODP)
    assert dedup_bytes(back) == model_bytes + 4  # + ODP's fp32 threshold in layer 1
    with torch.no_grad():
        assert torch.equal(back(ids), want)
    with pytest.raises(ValueError, match="no moekit GPT attention"):
        mcmoe(Two(), [torch.randn(4, 32)], group=16, attention_bits=4)
    with pytest.raises(ValueError, match="bits must be one of"):
        mcmoe(GPT(cfg), batches, group=16, attention_bits=5)
