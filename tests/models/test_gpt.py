"""GPT: causality, KV cache, save/load, and the DA-MoE importance against an oracle built from the weights."""

import math

import pytest
import torch

from moekit import MoE
from moekit.models import GPT, GPTConfig
from moekit.routers import TopK, register_router

CFG = GPTConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, d_ff=64)


@register_router("test_importance_topk")
class ImportanceTopK(TopK):
    """TopK that insists on the attention importance (exercises the explicit-attention path)."""

    context_keys = ("importance",)

    def forward(self, x, importance=None, **context):
        assert importance is not None and importance.shape == (x.shape[0],)
        self.seen = importance
        return super().forward(x)


CONFIGS = {
    "dense": CFG,
    "moe": CFG.with_moe(4, 2),
    "moe-importance": CFG.with_moe(4, 2, router="test_importance_topk"),
    "moe-dynamic-k": CFG.with_moe(4, 2, router="dynamic_k", router_args={"k_min": 1, "k_max": 3}),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_causality(kind):
    torch.manual_seed(0)
    model = GPT(CONFIGS[kind]).eval()
    ids = torch.randint(0, 97, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_importance_path_matches_sdpa_and_is_causally_normalised():
    torch.manual_seed(0)
    plain = GPT(CONFIGS["moe"]).eval()
    imp = GPT(CONFIGS["moe-importance"]).eval()
    imp.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (3, 16))
    torch.testing.assert_close(imp(ids), plain(ids), atol=1e-5, rtol=1e-5)
    seen = imp.blocks[0].ffn.gate.seen.view(3, 16)
    assert torch.all(seen > 0) and torch.all(seen <= torch.arange(1, 17))
    assert torch.allclose(seen[:, 0], torch.ones(3))  # the first token can only attend to itself
    # the same importance for the new tokens when decoding with a KV cache
    caches = [{} for _ in imp.blocks]
    imp(ids[:, :10], caches)
    imp(ids[:, 10:], caches)
    torch.testing.assert_close(imp.blocks[0].ffn.gate.seen.view(3, 6), seen[:, 10:], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- DA-MoE importance oracle
# Our causal rule (papers.md §5.2, README): importance_t = (t + 1) * mean_heads P[t, t], P the layer's
# causal attention probabilities. Recomputed here from the weights, in float64, without moekit code.


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x_BHTK, theta):
    """Rotate the pairs (x[2i], x[2i+1]) of position p by the angle p * theta ** (-2i / K), as complex numbers."""
    B, H, T, K = x_BHTK.shape
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
    z = torch.view_as_complex(x_BHTK.reshape(B, H, T, K // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(B, H, T, K)


def _attention_probs(block, x_BTD, cfg):
    B, T, D = x_BTD.shape
    H = cfg.n_heads
    K = D // H
    h = _rms(x_BTD.double(), block.attn_norm.weight.detach().double(), cfg.norm_eps)
    W = block.attn.qkv.weight.detach().double()  # rows: q (head-major), then k, then v

    def heads(w):
        return (h @ w.T).view(B, T, H, K).transpose(1, 2)

    q, k = _rope(heads(W[:D]), cfg.rope_theta), _rope(heads(W[D : 2 * D]), cfg.rope_theta)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(K)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1)  # [B, H, T, T]


def _importance(p_BHTT):
    T = p_BHTT.shape[-1]
    return p_BHTT.diagonal(dim1=-2, dim2=-1).mean(dim=1) * torch.arange(1, T + 1, dtype=p_BHTT.dtype)


def test_importance_formula_on_a_hand_built_attention_matrix():
    p = torch.tensor([[[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.5, 0.3, 0.2]],
                       [[1.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.2, 0.2, 0.6]]]])  # [B=1, H=2, T=3, T=3]
    # mean over heads of the diagonal: 1, 0.5, 0.4; times t + 1 = 1, 2, 3
    torch.testing.assert_close(_importance(p), torch.tensor([[1.0, 1.0, 1.2]]))


def _exposed(block):
    gate = block.ffn.gate
    return gate.seen if hasattr(gate, "seen") else block.ffn.last_routing.importance


@pytest.mark.parametrize("kind", ["moe-importance", "moe-dynamic-k"])
def test_importance_equals_the_causal_rule_recomputed_from_the_weights(kind):
    torch.manual_seed(0)
    cfg = CONFIGS[kind]
    model = GPT(cfg).eval()
    inputs = {}
    for i, b in enumerate(model.blocks):
        with torch.no_grad():  # init (std 0.02) attends almost uniformly: sharpen the attention
            b.attn.qkv.weight.normal_(0, 0.4)
        b.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        model(ids)
    for i, b in enumerate(model.blocks):
        want = _importance(_attention_probs(b, inputs[i], cfg))  # [B, T]
        got = _exposed(b).view(2, 12)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert float(want[:, 1:].std()) > 0.3  # a far from uniform attention
        if kind == "moe-dynamic-k":  # never trained: scale 1, K = clamp(ceil(3 * importance), 1, 3)
            k = torch.ceil(3 * want.float()).clamp(1, 3).long().reshape(-1)
            assert b.ffn.last_routing.k_per_token.tolist() == k.tolist()


def test_uniform_attention_has_importance_one_everywhere():
    """With q = 0 every token attends uniformly to its t + 1 keys: P[t, t] = 1 / (t + 1), importance 1."""
    torch.manual_seed(0)
    model = GPT(CONFIGS["moe-importance"]).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.qkv.weight[: CFG.d_model].zero_()
    model(torch.randint(0, 97, (2, 10)))
    for b in model.blocks:
        torch.testing.assert_close(b.ffn.gate.seen, torch.ones(20), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_generate_with_kv_cache_equals_full_forward(kind):
    torch.manual_seed(0)
    model = GPT(CONFIGS[kind]).eval()
    prompt = torch.randint(0, 97, (2, 6))
    out = model.generate(prompt, 10)
    full = model(out[:, :-1]).argmax(-1)
    assert torch.equal(out[:, 6:], full[:, 5:])


def _sampled_by_hand(model, prompt, steps, temperature, top_k, top_p, seed):
    """Full forward passes (no cache), truncation written here: top-k, then the nucleus."""
    gen, ids = torch.Generator().manual_seed(seed), prompt
    for _ in range(steps):
        logits = model(ids)[:, -1].float() / temperature
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        p, order = logits.softmax(-1).sort(-1, descending=True)
        drop = (p.cumsum(-1) - p) >= top_p
        drop[:, 0] = False
        p = p.masked_fill(drop, 0)
        choice = torch.multinomial(torch.zeros_like(p).scatter(-1, order, p), 1, generator=gen)
        ids = torch.cat([ids, choice], 1)
    return ids


def test_generate_samples_with_top_k_top_p_and_a_seed():
    torch.manual_seed(0)
    model = GPT(CONFIGS["moe"]).eval()
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, 8, 1.3, torch.Generator().manual_seed(7), top_k=20, top_p=0.8)
    assert torch.equal(out, _sampled_by_hand(model, prompt, 8, 1.3, 20, 0.8, seed=7))
    assert torch.equal(model.generate(prompt, 8, 1.0, top_k=1), model.generate(prompt, 8))  # top-1 is greedy


def test_generate_stops_rows_at_eos_and_pads_them():
    torch.manual_seed(0)
    model = GPT(CONFIGS["dense"]).eval()
    prompt = torch.randint(0, 97, (2, 4))
    def gen(**kw):  # sampled, with the same draws every time
        return model.generate(prompt, 12, 1.0, torch.Generator().manual_seed(0), **kw)

    free = gen()[:, 4:].tolist()
    j = next(j for j in range(1, 12) if free[0][j] not in free[0][:j])
    eos = free[0][j]  # row 0 produces it first as its (j+1)-th new token

    def finished(row):  # the row up to its first eos, then eos
        n = row.index(eos) + 1 if eos in row else len(row)
        return row[:n] + [eos] * (len(row) - n), n

    rows = [finished(r) for r in free]
    new = max(n for _, n in rows)
    out = gen(eos_token_id=eos)
    assert rows[0][1] == j + 1 and out[:, 4:].tolist() == [r[:new] for r, _ in rows]
    assert gen(eos_token_id=[eos, 96])[0, 4:].tolist() == rows[0][0][:new]
    with pytest.raises(ValueError, match="eos_token_id: 97"):
        model.generate(prompt, 2, eos_token_id=97)


def test_save_load_round_trip_and_config_mismatch(tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIGS["moe"])
    model.save(tmp_path / "m")
    loaded = GPT.load(tmp_path / "m")
    ids = torch.randint(0, 97, (1, 10))
    torch.testing.assert_close(loaded(ids), model(ids))
    assert isinstance(loaded.blocks[0].ffn, MoE)
    other = GPT(CFG)
    with pytest.raises(ValueError, match=r"checkpoint config differs.*ffn: checkpoint="):
        other.load_weights(tmp_path / "m")
    wider = GPT(GPTConfig(**{**CFG.to_dict(), "d_model": 64}))
    with pytest.raises(ValueError, match=r"d_model: checkpoint=32 model=64"):
        wider.load_weights(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        GPT.load(tmp_path / "nowhere")


def test_token_ids_outside_vocabulary_are_rejected():
    model = GPT(CFG)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\).*tokenizer"):
        model(torch.tensor([[1, 2, 500]]))


def test_bad_config():
    with pytest.raises(ValueError, match="n_heads=3"):
        GPTConfig(d_model=32, n_heads=3)
    with pytest.raises(ValueError, match="unknown kind 'conv'"):
        GPT(GPTConfig(**{**CFG.to_dict(), "ffn": [{"kind": "conv"}, {"kind": "dense"}]}))


def test_active_params_count_k_of_e_experts():
    dense, moe = GPT(CFG), GPT(CONFIGS["moe"])
    router_params = sum(b.ffn.gate.weight.numel() for b in moe.blocks)
    assert moe.active_params() == dense.num_params() + router_params
    assert moe.num_params() > moe.active_params()
