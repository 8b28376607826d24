"""Read-ME's PreGate (papers.md §2.3) against a second implementation written from the spec.

The oracle below never calls moekit: it reads the module's weights and recomputes the block in
float64 with explicit loops over tokens and heads: RMSNorm, biased q/k/v/o, RoPE, causal softmax
of ``q . k`` with **no** 1/sqrt(d_head) scaling (the official code's ``--attn_normalizer 1``), a
plain (not gated) SiLU MLP and a biased linear head.
"""

import math

import pytest
import torch

from moekit.models.pregate import PreGate

EPS = 1e-5  # RMSNorm epsilon (PreGate's default)
THETA = 10000.0  # RoPE base


def _rmsnorm(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def _rope(v, pos):
    """Rotate the pairs (2i, 2i+1) of one head vector by ``pos * THETA^(-2i/K)``. moekit pairs
    adjacent channels (GPT-J style); Llama's rotate-half pairs (i, i + K/2). Both are RoPE and differ
    only by a fixed permutation of each head's q/k channels, i.e. a reparameterisation of q/k."""
    K = v.numel()
    out = v.clone()
    for i in range(K // 2):
        a = pos * THETA ** (-2 * i / K)
        x0, x1 = float(v[2 * i]), float(v[2 * i + 1])
        out[2 * i] = x0 * math.cos(a) - x1 * math.sin(a)
        out[2 * i + 1] = x0 * math.sin(a) + x1 * math.cos(a)
    return out


def oracle(pg: PreGate, ids, scale: float = 1.0):
    """Logits ``[T, E]`` of one sequence, from the spec. ``scale`` multiplies q . k (spec: 1)."""
    W = {n: p.detach().double() for n, p in pg.named_parameters()}
    D = W["embed.weight"].shape[1]
    H = pg.n_heads
    K = D // H
    T = len(ids)
    x = torch.stack([W["embed.weight"][i] for i in ids])  # [T, D]
    u = _rmsnorm(x, W["attn_norm.weight"])
    qkv = u @ W["qkv.weight"].T + W["qkv.bias"]  # columns: q (head 0, head 1, ...), then k, then v
    q, k, v = qkv[:, :D], qkv[:, D : 2 * D], qkv[:, 2 * D :]
    att = torch.zeros(T, D, dtype=torch.float64)
    for h in range(H):
        sl = slice(h * K, (h + 1) * K)
        qs = [_rope(q[t, sl], t) for t in range(T)]
        ks = [_rope(k[s, sl], s) for s in range(T)]
        for t in range(T):
            scores = torch.tensor([scale * float(qs[t] @ ks[s]) for s in range(t + 1)], dtype=torch.float64)
            p = torch.exp(scores - scores.max())
            p = p / p.sum()
            att[t, sl] = sum(p[s] * v[s, sl] for s in range(t + 1))
    x = x + att @ W["o_proj.weight"].T + W["o_proj.bias"]
    m = _rmsnorm(x, W["mlp_norm.weight"]) @ W["proj_1.weight"].T + W["proj_1.bias"]
    x = x + (m * torch.sigmoid(m)) @ W["proj_2.weight"].T + W["proj_2.bias"]
    return _rmsnorm(x, W["norm.weight"]) @ W["head.weight"].T + W["head.bias"]


def _pregate(**kw):
    torch.manual_seed(0)
    pg = PreGate(30, 3, d_model=16, n_heads=2, d_ff=24, max_seq_len=32, **kw).eval()
    with torch.no_grad():  # every weight and bias away from its initial value, scores large enough to matter
        for name, p in pg.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
        pg.qkv.weight.mul_(2.0)
    return pg


def test_pregate_forward_equals_the_spec_oracle():
    pg = _pregate()
    ids = torch.tensor([[3, 17, 5, 5, 29, 0, 11, 8, 21], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    got = pg(ids).double()
    for b in range(ids.shape[0]):
        torch.testing.assert_close(got[b], oracle(pg, ids[b].tolist()), atol=1e-5, rtol=1e-5)
    # the scale is what changes the answer: a 1/sqrt(d_head) oracle is far from the module
    assert (got[0] - oracle(pg, ids[0].tolist(), scale=1 / math.sqrt(8))).abs().max() > 1e-2
    assert torch.equal(pg.route(ids), got.argmax(-1))


def test_pregate_honours_an_explicit_attention_scale():
    pg = _pregate(attn_scale=0.25)
    ids = [4, 9, 9, 2, 13, 7]
    torch.testing.assert_close(pg(torch.tensor([ids]))[0].double(), oracle(pg, ids, scale=0.25), atol=1e-5, rtol=1e-5)


def test_pregate_incremental_decoding_equals_the_oracle():
    pg = _pregate()
    ids = torch.tensor([[3, 17, 5, 5, 29, 0, 11]])
    cache = {}
    steps = [pg(ids[:, :3], cache)] + [pg(ids[:, t : t + 1], cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1)[0].double(), oracle(pg, ids[0].tolist()), atol=1e-5, rtol=1e-5)


def test_pregate_size_is_read_me_table_1():
    """Table 1: 1 layer, 4 heads, vocab 32000, width 512, MLP 512 -> 18.0M parameters. Counted from the
    spec (biased q/k/v/o, plain two-matrix MLP, three RMSNorms, biased head over 7 experts): 17,965,063.
    A gated (SwiGLU) MLP would add 262,656 (18.2M)."""
    V, e, f, N = 32000, 512, 512, 7
    want = V * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * f + f) + (f * e + e) + 3 * e + (e * N + N)
    pg = PreGate(V, N, d_model=e, n_heads=4, d_ff=f, max_seq_len=16)
    assert sum(p.numel() for p in pg.parameters()) == want == 17_965_063
    assert round(want / 1e6, 1) == 18.0


def test_pregate_embedding_copies_the_first_columns_of_the_lm_embedding():
    pg = PreGate(10, 2, d_model=8, n_heads=2)
    lm = torch.arange(12 * 16, dtype=torch.float32).view(12, 16)
    pg.init_embedding(lm)
    assert pg.embed.weight[3, 5].item() == 3 * 16 + 5
    torch.testing.assert_close(pg.embed.weight, lm[:10, :8], atol=0, rtol=0)


@pytest.mark.parametrize("bad", [dict(d_model=15, n_heads=2), dict(d_model=12, n_heads=4), dict(num_experts=0)])
def test_pregate_bad_shapes(bad):
    args = dict(vocab_size=10, num_experts=2, d_model=16, n_heads=2) | bad
    with pytest.raises(ValueError, match="PreGate"):
        PreGate(**args)
