"""MoLE: train form against an independent oracle of the paper's equation (moekit.models.mole.train); the
re-parameterised tables (moekit.models.mole.reparam): their bytes, exact logits, quantized sizes; bad input."""

import json
import math

import numpy as np
import pytest
import torch

from moekit.models import GPT, GPTConfig
from moekit.models.mole import MANIFEST, TABLE, MoLE, reparameterize


def _model(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=300, d_model=32, n_layers=layers, n_heads=2, max_seq_len=32, d_ff=64,
                    ffn=[{"kind": "mole", "num_experts": 4, "d_ff": 48}] * layers)
    return GPT(cfg).eval()


# ----------------------------------------------------------------------------------- independent oracles
# Written from the paper's equations (papers.md §3.2-3.3), calling nothing from moekit but its weights.


def _rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _gelu(x):  # exact (erf) GELU of the Pythia-style non-gated expert FFN
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _swiglu_ffn(ffn, x):  # the shared FFN: down(silu(gate x) * up x)
    g = x @ ffn.gate_proj.weight.T
    return (g * torch.sigmoid(g) * (x @ ffn.up_proj.weight.T)) @ ffn.down_proj.weight.T


def _expert(m, j, e):  # FFN_j(e) = W_down,j GELU(W_up,j e)
    return _gelu(e @ m.experts.up_proj[j].T) @ m.experts.down_proj[j].T


def _router_probs(m, u):  # softmax over the N experts of W_r u, in fp32
    z = u.float() @ m.router.weight.float().T
    z = torch.exp(z - z.max(-1, keepdim=True).values)
    return z / z.sum(-1, keepdim=True)


def _mole_oracle(m, u_TD, raw_emb_TD):
    """shared(u) + sum_j softmax_j(W_r u) * FFN_j(RMSNorm_l(E[id])), every expert active."""
    g = _router_probs(m, u_TD).to(u_TD.dtype)
    e = _rms_norm(raw_emb_TD, m.expert_norm.weight, m.expert_norm.eps)
    out = _swiglu_ffn(m.shared, u_TD)
    for j in range(m.num_experts):
        out = out + g[:, j : j + 1] * _expert(m, j, e)
    return out


def _randomise_norms(model_or_layers):
    """Expert norms at their init (all ones) would hide a missing or shared norm weight."""
    layers = [b.ffn for b in model_or_layers.blocks] if hasattr(model_or_layers, "blocks") else model_or_layers
    with torch.no_grad():
        for m in layers:
            m.expert_norm.weight.uniform_(0.5, 1.5)


def test_train_form_equals_the_papers_equation():
    torch.manual_seed(0)
    m = MoLE(16, 32, num_experts=3, expert_d_ff=24).double()
    _randomise_norms([m])
    emb = torch.nn.Embedding(50, 16).double()
    ids = torch.randint(0, 10, (2, 9))  # many repeated ids: the unique-id path must gather right
    u = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    y = m(u, token_ids=ids, embeddings=emb(ids))
    want = _mole_oracle(m, u.reshape(-1, 16), emb.weight[ids.reshape(-1)]).reshape(2, 9, 16)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    gy = torch.randn_like(y)
    a = torch.autograd.grad(y, [u, *m.parameters(), emb.weight], gy)
    b = torch.autograd.grad(want, [u, *m.parameters(), emb.weight], gy)
    for x1, x2 in zip(a, b):  # the router's softmax runs in fp32, as in the paper
        torch.testing.assert_close(x1, x2, atol=1e-6, rtol=1e-5)


def test_router_is_a_softmax_over_experts_per_token_and_every_expert_is_active():
    """Hand-made router: token 0 prefers expert 0, token 1 expert 2; each row of g sums to 1."""
    m = MoLE(3, 4, num_experts=3, expert_d_ff=4)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(3))
    u = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, math.log(3.0), math.log(6.0)]])
    g = m.gates(u)
    torch.testing.assert_close(g, torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.3, 0.6]]))
    assert g.dtype == torch.float32
    assert m.gates(u.to(torch.bfloat16)).dtype == torch.float32  # fp32 softmax whatever the input


def test_expert_gradients_gradcheck():
    """float64 gradcheck of the expert path (embedding table, expert norm, expert weights) through
    the unique-id gather and the grouped experts' own backward; the router and shared FFN are fixed."""
    torch.manual_seed(0)
    m = MoLE(6, 8, num_experts=2, expert_d_ff=5).double()
    _randomise_norms([m])
    ids = torch.tensor([[1, 3, 1, 0], [3, 2, 2, 1]])
    u = torch.randn(2, 4, 6, dtype=torch.float64)
    names = ["expert_norm.weight", "experts.up_proj", "experts.down_proj"]
    params = dict(m.named_parameters())

    def f(table, *weights):
        return torch.func.functional_call(m, dict(zip(names, weights)), (u,),
                                          {"token_ids": ids, "embeddings": table[ids]})

    table = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    inputs = (table, *(params[n].detach().clone().requires_grad_() for n in names))
    assert torch.autograd.gradcheck(f, inputs)


def test_mole_in_gpt_experts_read_the_raw_embedding_router_and_shared_the_hidden_state():
    model = _model()
    _randomise_norms(model)
    seen = {}
    for i, b in enumerate(model.blocks):
        b.ffn.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
    ids = torch.randint(0, 300, (2, 7))
    model(ids)
    raw = model.embed.weight[ids.reshape(-1)]  # E[id]: the raw embedding, not the layer's input
    for i, b in enumerate(model.blocks):
        u, out = seen[i]
        assert not torch.allclose(u.reshape(-1, 32), raw, atol=1e-2)  # the two inputs really differ
        torch.testing.assert_close(out.reshape(-1, 32), _mole_oracle(b.ffn, u.reshape(-1, 32), raw),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,np_dtype,tol", [(torch.float32, "<f4", 1e-6), (torch.float16, "<f2", 2e-3)])
def test_table_bytes_follow_the_V_L_N_D_layout(tmp_path, dtype, np_dtype, tol):
    """The row of (token v, layer l, expert j) starts at byte ((v*L + l)*N + j)*D*itemsize of table.bin
    and holds FFN_j(RMSNorm_l(E[v])) computed here in float64 (every layer has its own norm)."""
    import copy

    model = _model()
    _randomise_norms(model)
    reparameterize(model, tmp_path / "t", dtype=dtype, progress=False)
    V, L, N, D = 300, 2, 4, 32
    size = np.dtype(np_dtype).itemsize
    data = (tmp_path / "t" / TABLE).read_bytes()
    assert len(data) == V * L * N * D * size
    E = model.embed.weight.detach().double()
    layers = [copy.deepcopy(b.ffn).double() for b in model.blocks]
    for v in (0, 1, 137, 299):
        for layer, m in enumerate(layers):
            e = _rms_norm(E[v], m.expert_norm.weight, m.expert_norm.eps)
            for j in range(N):
                got = np.frombuffer(data, dtype=np_dtype, count=D, offset=((v * L + layer) * N + j) * D * size)
                want = _expert(m, j, e).detach()
                torch.testing.assert_close(torch.from_numpy(got.astype(np.float64)), want, atol=tol, rtol=tol)


def test_mole_needs_ids_and_embeddings():
    with pytest.raises(ValueError, match="needs token_ids"):
        MoLE(8, 8)(torch.randn(2, 8))


def test_reparameterized_logits_equal_train_form(tmp_path):
    model = _model()
    ids = torch.randint(0, 300, (3, 20))
    ref = model(ids)
    fp32 = reparameterize(model, tmp_path / "fp32", dtype=torch.float32, progress=False).eval()
    assert (fp32(ids) - ref).abs().max() <= 1e-4
    fp16 = reparameterize(model, tmp_path / "fp16", progress=False).eval()
    prompts = torch.randint(0, 300, (4, 6))
    assert torch.equal(fp16.generate(prompts, 12), model.generate(prompts, 12))
    # the inference form computes no expert and holds no expert weights
    assert not any("experts." in n for n, _ in fp16.named_parameters())
    manifest = json.loads((tmp_path / "fp16" / MANIFEST).read_text())
    assert manifest["bytes"] == 300 * 2 * 4 * 32 * 2 == (tmp_path / "fp16" / TABLE).stat().st_size


def test_mole_gpt_trains():
    model = _model()
    model.train()
    ids = torch.randint(0, 300, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model.loss(ids, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1.0


def test_quantized_tables_size_and_quality(tmp_path):
    model = _model()
    ids = torch.randint(0, 300, (3, 20))
    ref = model(ids)
    sizes, errs = {}, {}
    for kind in (torch.float16, "int8", "nf4"):
        inf = reparameterize(model, tmp_path / str(kind), dtype=kind, block=16, progress=False).eval()
        table = inf.blocks[0].ffn.table
        sizes[kind] = table.manifest["bytes"]
        assert (tmp_path / str(kind) / TABLE).stat().st_size == sizes[kind]
        errs[kind] = float((inf(ids) - ref).detach().abs().max())
        assert table.bytes_read == len(ids.unique()) * table.bytes_per_token
    assert errs[torch.float16] < errs["int8"] < errs["nf4"] < 0.1
    assert 0.25 <= sizes["nf4"] / sizes[torch.float16] <= 0.32  # paper: NF4 at about 25% of fp16
    with pytest.raises(ValueError, match="block=24 must divide d_model=32"):
        reparameterize(model, tmp_path / "bad", dtype="nf4", block=24, progress=False)
