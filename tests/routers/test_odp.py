"""ODP: the second expert is dropped exactly below the threshold, never for a protected token; the
importance of Eq. 6 against a loop over the attention matrix."""

import math

import pytest
import torch

import moekit.routers.odp  # noqa: F401  (registers "odp")
from moekit import MoE
from moekit.models import GPT, GPTConfig
from moekit.routers import TopK, build_router
from moekit.routers.odp import ODP, attention_importance, top2_ratio


def _router(mu, protect=0.0, renormalize=True, seed=0):
    torch.manual_seed(seed)
    odp = ODP(TopK(k=2), mu=mu, protect=protect, renormalize=renormalize).bind(16, 5).eval()
    with torch.no_grad():
        odp.inner.weight.mul_(5)  # spread the softmax so that the ratios w1 / w0 spread over (0, 1)
    return odp


def _pairs(r_inner):
    p = torch.softmax(r_inner.logits.detach(), -1)
    top = torch.topk(p, 2)
    w = top.values / top.values.sum(1, keepdim=True)
    return top.indices, w


def test_drops_exactly_the_second_experts_below_the_threshold():
    odp = _router(mu=0.6)
    x = torch.randn(50, 16)
    r = odp(x)
    idx, w = _pairs(odp.inner(x))
    want = []
    for t in range(50):
        if float(w[t, 1] / w[t, 0]) < 0.6:
            want.append((t, int(idx[t, 0]), 1.0))  # the pair's weight goes to the first expert
        else:
            want += [(t, int(idx[t, 0]), float(w[t, 0])), (t, int(idx[t, 1]), float(w[t, 1]))]
    got = list(zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist()))
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in want]
    assert [w for *_, w in got] == pytest.approx([w for *_, w in want], abs=1e-6)
    assert 0 < int((r.k_per_token == 1).sum()) < 50 and torch.equal(r.k_per_token, r.experts_per_token())


def test_without_renormalising_the_kept_weight_is_w0():
    odp = _router(mu=2.0, renormalize=False)  # every ratio is < 1 < 2: all pruned
    x = torch.randn(10, 16)
    r = odp(x)
    _, w = _pairs(odp.inner(x))
    assert r.num_assignments == 10 and torch.allclose(r.weight, w[:, 0])


def test_threshold_zero_prunes_nothing():
    odp = _router(mu=0.0)
    x = torch.randn(10, 16)
    r, inner = odp(x), odp.inner(x)
    assert torch.equal(r.expert, inner.expert) and torch.equal(r.weight, inner.weight)
    _, w = _pairs(inner)
    assert torch.allclose(top2_ratio(inner), w[:, 1] / w[:, 0])


def test_protected_tokens_keep_both_experts():
    odp = _router(mu=2.0, protect=0.1)  # everyone would be pruned
    assert odp.context_keys == ("importance",)
    x, imp = torch.randn(25, 16), torch.rand(25)
    r = odp(x, importance=imp)
    protected = set(torch.topk(imp, math.ceil(0.1 * 25)).indices.tolist())
    assert len(protected) == 3  # ceil(2.5)
    per = r.experts_per_token()
    assert {t for t in range(25) if per[t] == 2} == protected
    with pytest.raises(ValueError, match="needs importance"):
        odp(x)


def test_eq6_importance_against_a_loop():
    torch.manual_seed(1)
    B, H, L, D = 2, 3, 6, 4
    x = torch.randn(B, L, D)
    scores = torch.randn(B, H, L, L).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    A = torch.softmax(scores, -1)
    got, code = attention_importance(x, A), attention_importance(x, A, received=False)
    for b in range(B):
        for j in range(L):
            norm = float(x[b, j].abs().sum())
            received = sum(float(A[b, :, i, j].mean()) for i in range(j, L)) / (L - j)
            assert float(got[b, j]) == pytest.approx(norm * received, rel=1e-5)
            assert float(code[b, j]) == pytest.approx(norm / (L - j), rel=1e-5)  # rows sum to one


def test_only_a_dropless_top2_router_is_accepted_and_it_is_registered():
    assert isinstance(build_router("odp"), ODP)
    with pytest.raises(ValueError, match="top-2"):
        ODP(TopK(k=1))
    with pytest.raises(ValueError, match="top-2"):
        ODP(TopK(k=2, capacity_factor=1.0))


def test_gpt_passes_its_causal_importance_to_a_protecting_odp():
    cfg = GPTConfig(vocab_size=31, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, d_ff=32)
    torch.manual_seed(2)
    model = GPT(cfg.with_moe(4, 2)).eval()
    moe = model.blocks[0].ffn
    assert isinstance(moe, MoE)
    moe.gate = ODP(moe.gate, mu=2.0, protect=0.25)
    with torch.no_grad():
        model(torch.randint(0, 31, (1, 8)))
    assert moe.last_routing.num_assignments == 8 + 2  # everyone pruned except ceil(0.25 * 8) = 2 tokens
