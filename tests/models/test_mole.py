"""MoLE: train form against an independent oracle of the paper's equation; table bytes, int8 and NF4 against
hand-worked values (QLoRA's published levels); re-parameterised tables exact; bad input."""

import json
import math

import numpy as np
import pytest
import torch

from moekit.models import GPT, GPTConfig
from moekit.models.mole import MANIFEST, TABLE, LookupTable, MoLE, reparameterize


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


def test_int8_absmax_per_row_hand_worked():
    """Row scale = absmax / 127 (stored fp16 after the codes), code = round-to-nearest(x / scale)."""
    from moekit.models.mole import dequantize, quantize

    x = torch.tensor([[[[127 / 128, -0.5, 1.4 / 128, -1.6 / 128], [-2.0, 0.5, 0.3, 0.0]]]])  # [b=1, L=1, N=2, D=4]
    # row 0: scale 1/128, x / scale = 127, -64, 1.4, -1.6; row 1: scale 2/127, x / scale = -127, 31.75, 19.05, 0
    codes = np.array([127, -64, 1, -2, -127, 32, 19, 0], dtype=np.int8)
    scales = np.array([1 / 128, 2 / 127], dtype="<f2")
    rec = quantize(x, "int8")
    assert rec.dtype == np.uint8 and rec.shape == (1, 8 + 2 * 2)
    assert rec.tobytes() == codes.tobytes() + scales.tobytes()
    y = dequantize(rec, "int8", (1, 2, 4))
    want = torch.from_numpy(codes.astype(np.float32)).view(2, 4) * torch.from_numpy(scales.astype(np.float32)).view(2, 1)
    assert torch.equal(y.view(2, 4), want)


# QLoRA's NormalFloat-4 levels as published (Dettmers et al. 2023, appendix; bitsandbytes get_4bit_type("nf4")).
NF4_QLORA = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_levels_are_qloras():
    from moekit.models.mole import NF4_LEVELS

    assert torch.equal(NF4_LEVELS.float(), torch.tensor(NF4_QLORA))
    # and they are what QLoRA derives: N(0, 1) quantiles at linspace(0.9677083, 0.5), 8 positive and
    # 7 negative ones plus an exact zero, divided by the largest
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8)[:-1].double())
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(torch.tensor(NF4_QLORA, dtype=torch.float64), v / v.max(), atol=1e-7, rtol=0)


def test_nf4_codes_scales_and_nibble_order_hand_made():
    """Two blocks of 64 with different absmax (2.0 and 0.5): each value takes the code of its nearest
    published level, codes are packed two per byte with the FIRST value in the high nibble (bitsandbytes),
    then one fp16 absmax per block follows; dequantize gives exactly level * absmax."""
    from moekit.models.mole import dequantize, quantize

    levels = torch.tensor(NF4_QLORA)
    gen = torch.Generator().manual_seed(0)
    codes0 = torch.cat([torch.tensor([15, 0, 7, 1]), torch.randint(0, 16, (60,), generator=gen)])
    codes1 = torch.cat([torch.tensor([0, 15]), torch.randint(0, 16, (62,), generator=gen)])
    block0 = 2.0 * levels[codes0]  # exactly on the levels
    # block 1: 0.3 of the way to a neighbouring level (nearest is still the level itself); ±1 stay exact
    step = torch.where(torch.arange(64) % 2 == 0, 1, -1)
    nb = (codes1 + step).clamp(0, 15)
    inner = (codes1 > 0) & (codes1 < 15)
    block1 = 0.5 * torch.where(inner, levels[codes1] + 0.3 * (levels[nb] - levels[codes1]), levels[codes1])
    x = torch.cat([block0, block1]).view(1, 1, 1, 128)
    rec = quantize(x, "nf4")
    assert rec.shape == (1, 64 + 2 * 2)
    assert rec[0, 0] == 0xF0 and rec[0, 1] == 0x71  # codes 15, 0 | 7, 1: first value in the high nibble
    c = torch.cat([codes0, codes1]).numpy().astype(np.uint8)
    want = ((c[0::2] << 4) | c[1::2]).astype(np.uint8).tobytes() + np.array([2.0, 0.5], dtype="<f2").tobytes()
    assert rec.tobytes() == want
    y = dequantize(rec, "nf4", (1, 1, 128)).view(128)
    assert torch.equal(y[:64], 2.0 * levels[codes0]) and torch.equal(y[64:], 0.5 * levels[codes1])
    # the block is a parameter: block=32 stores one absmax per 32 values
    assert quantize(x, "nf4", block=32).shape == (1, 64 + 4 * 2)


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


def test_inference_fast_path_equals_plain_path_and_follows_weight_changes(tmp_path):
    """Without autograd the router rides in the shared FFN's up projection; same logits, and a weight
    changed in place (an optimizer step, load_state_dict) is picked up."""
    model = _model()
    inf = reparameterize(model, tmp_path / "t", dtype=torch.float32, progress=False).eval()
    ids = torch.randint(0, 300, (2, 9))
    plain = inf(ids)  # grad enabled: the plain path
    with torch.no_grad():
        torch.testing.assert_close(inf(ids), plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inf(ids[:1, :1]), inf(ids)[:1, :1], atol=1e-5, rtol=1e-5)  # T=1 path
        ffn = inf.blocks[1].ffn
        ffn.router.weight.mul_(-3.0)
        ffn.shared.up_proj.weight.add_(0.1)
        fast = inf(ids)
    torch.testing.assert_close(fast, inf(ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, plain, atol=1e-3)


def test_bytes_read_per_new_token_is_exact(tmp_path):
    model = _model()
    inf = reparameterize(model, tmp_path / "t", progress=False).eval()
    table = inf.blocks[0].ffn.table
    ids = torch.tensor([[5, 7, 5, 9, 7]])  # 3 unique ids
    inf(ids)
    assert table.bytes_per_token == 2 * 4 * 32 * 2  # layers x experts x d_model x bytes
    assert table.bytes_read == 3 * table.bytes_per_token  # read once for all layers


def test_table_for_another_model_truncated_or_missing(tmp_path):
    model = _model()
    reparameterize(model, tmp_path / "t", progress=False)
    manifest = json.loads((tmp_path / "t" / MANIFEST).read_text())
    LookupTable(tmp_path / "t", expect_hash=manifest["source_sha256"])
    with pytest.raises(ValueError, match="built for other weights"):
        LookupTable(tmp_path / "t", expect_hash="0" * 64)
    data = (tmp_path / "t" / TABLE).read_bytes()
    (tmp_path / "t" / TABLE).write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"table.bin: 153,590 bytes, moekit.json records 153,600 \(truncated"):
        LookupTable(tmp_path / "t")
    (tmp_path / "t" / TABLE).unlink()
    with pytest.raises(ValueError, match="missing"):
        LookupTable(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        LookupTable(tmp_path / "nowhere")


def test_token_id_outside_vocabulary_and_bad_dtype(tmp_path):
    model = _model(layers=1)
    inf = reparameterize(model, tmp_path / "t", progress=False)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        inf.blocks[0].ffn.table.read(torch.tensor([3, 300]), 0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        reparameterize(model, tmp_path / "u", dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match="no MoLE layer"):
        reparameterize(GPT(GPTConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=8)), tmp_path / "v")
    assert np.dtype(inf.blocks[0].ffn.table.rows.dtype).itemsize == 2


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


@pytest.mark.parametrize("kind,rel", [("int8", 0.01), ("nf4", 0.12)])
def test_quantize_round_trip(kind, rel):
    from moekit.models.mole import dequantize, quantize

    torch.manual_seed(0)
    x = torch.randn(7, 2, 3, 128)
    y = dequantize(quantize(x, kind), kind, (2, 3, 128))
    assert float((y - x).norm() / x.norm()) < rel
    if kind == "int8":  # absmax scaling reproduces each row's largest value exactly (to fp16)
        torch.testing.assert_close(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-3, atol=0)


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


def test_ram_row_cache_respects_its_budget(tmp_path):
    model = _model()
    reparameterize(model, tmp_path / "t", progress=False)
    plain = LookupTable(tmp_path / "t")
    n = plain.bytes_per_token
    table = LookupTable(tmp_path / "t", cache_bytes=2 * n + n // 2)  # room for 2 whole rows
    for ids, want_read in ([1, 2], 2), ([1], 0), ([3], 1), ([2], 1), ([1, 3], 1):
        before = table.bytes_read
        table._last = None  # a new forward
        rows = table.read(torch.tensor(ids), 1)
        plain._last = None
        torch.testing.assert_close(rows, plain.read(torch.tensor(ids), 1))
        assert table.bytes_read - before == want_read * n, ids
        assert table.cached_bytes <= 2 * n + n // 2
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        LookupTable(tmp_path / "t", cache_bytes=-1)


def test_load_served_from_checkpoint_and_table(tmp_path):
    from moekit.models.mole import load_served

    model = _model()
    model.save(tmp_path / "ckpt")
    served = reparameterize(model, tmp_path / "table", progress=False).eval()
    loaded = load_served(tmp_path / "ckpt", tmp_path / "table")
    ids = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(loaded(ids), served(ids))
    assert not any("experts." in n for n in loaded.state_dict())
    other = _model(seed=1)
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match="built for other weights"):
        load_served(tmp_path / "other", tmp_path / "table")


def test_load_served_keeps_embeddings_tied(tmp_path):
    from moekit.models.mole import load_served

    model = _model()
    model.save(tmp_path / "ckpt")
    reparameterize(model, tmp_path / "table", progress=False)
    loaded = load_served(tmp_path / "ckpt", tmp_path / "table")
    assert loaded.head.weight is loaded.embed.weight
