"""Routing statistics of calibration data against a hand count."""

import pytest
import torch

from moekit import MoE
from moekit.compress import build_compression, gather_stats
from moekit.routers import TopK
from tests.compress.fixed import Fixed


def test_gather_stats_counts_tokens_and_gate_mass_of_every_batch():
    model = Fixed([0, 2, 2, 0, 2], [0.5, 1.0, 0.25, 0.0, 2.0])
    stats = gather_stats(model, [torch.randn(5, 4), torch.randn(5, 4)])
    st = stats["moe"]
    # per batch: expert 0 gets one token with a non-zero weight (0.5), expert 2 three (1 + 0.25 + 2)
    assert st.tokens.tolist() == [2, 0, 6]
    assert st.gate.tolist() == pytest.approx([1.0, 0.0, 6.5])
    assert st.num_tokens == 10
    assert model.training  # the mode is restored


def _ffn(moe, e, x):
    """Expert ``e`` of a SwiGLU layer on one token, written out."""
    gate, up = (moe.experts.gate_up_proj[e].double() @ x).chunk(2)
    return moe.experts.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up)


def test_every_statistic_against_a_per_token_loop():
    torch.manual_seed(0)
    moe = MoE(4, 6, 4, router=TopK(k=2, renormalize=False)).eval()
    model = torch.nn.Sequential(moe)
    batches = [torch.randn(7, 4), torch.randn(5, 4)]
    st = gather_stats(model, batches, keep_inputs=9)["0"]
    W = moe.gate.weight.double()
    E = 4
    tokens, gate, soft, out_sum = [0] * E, [0.0] * E, [0.0] * E, torch.zeros(E, 4, dtype=torch.float64)
    reap, easy, ratios = [0.0] * E, [0.0] * E, []
    with torch.no_grad():
        for x in torch.cat(batches).double():
            p = torch.softmax(W @ x, -1)
            w, ids = p.topk(2)
            outs = [_ffn(moe, e, x) for e in range(E)]
            routed = sum(wi * outs[e] for wi, e in zip(w.tolist(), ids.tolist()))
            change = max(1 - float(torch.cosine_similarity(x, x + routed, dim=0)), 0.0)
            for wi, e in zip(w.tolist(), ids.tolist()):
                tokens[e] += 1
                gate[e] += wi
                reap[e] += wi / float(w.sum()) * float(outs[e].norm())
                easy[e] += wi * float(outs[e].norm()) * change
            ratios.append(float(w[1] / w[0]))
            soft = [s + float(pe) for s, pe in zip(soft, p)]
            out_sum += torch.stack(outs)
    assert st.tokens.tolist() == tokens and st.num_tokens == 12 and st.k == 2
    assert st.gate.tolist() == pytest.approx(gate, rel=1e-5)
    assert st.soft.tolist() == pytest.approx(soft, rel=1e-5)
    assert torch.allclose(st.mean_output, out_sum / 12, rtol=1e-4, atol=1e-6)
    assert st.reap.tolist() == pytest.approx([r / max(n, 1) for r, n in zip(reap, tokens)], rel=1e-4)
    assert st.easyep.tolist() == pytest.approx(easy, rel=1e-4, abs=1e-9)
    assert sorted(st.ratios.tolist()) == pytest.approx(sorted(ratios), rel=1e-5)
    assert torch.equal(st.inputs, torch.cat(batches)[:9])


def test_missing_statistics_say_how_to_get_them():
    st = gather_stats(Fixed([0], [1.0]), [])["moe"]
    with pytest.raises(ValueError, match="no mean expert outputs: no calibration token seen"):
        _ = st.mean_output
    with pytest.raises(ValueError, match="gather with keep_inputs > 0"):
        _ = st.inputs


class _Halves(torch.nn.Module):
    """Experts that are not GroupedExperts: every expert halves its input."""

    def forward(self, x, seg):
        return 0.5 * x


def test_experts_that_cannot_run_every_token_leave_those_statistics_unknown():
    model = Fixed([0, 2], [1.0, 1.0])
    model.moe.experts = _Halves()
    st = gather_stats(model, [torch.randn(2, 4)])["moe"]
    assert st.tokens.tolist() == [1, 0, 1] and torch.isnan(st.reap).all() and torch.isnan(st.easyep).all()
    with pytest.raises(ValueError, match="not in-memory GroupedExperts"):
        _ = st.mean_output
    with pytest.raises(ValueError, match="reap: the scores of layer 'moe' are unknown"):
        build_compression("reap", num_experts=2).compress_layer(model.moe, st)
