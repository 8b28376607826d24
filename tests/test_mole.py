"""MoLE: train form against a naive per-token computation; re-parameterised tables exact; bad input."""

import json

import numpy as np
import pytest
import torch

from moekit.models import GPT, GPTConfig
from moekit.mole import MANIFEST, TABLE, LookupTable, MoLE, reparameterize


def _model(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=300, d_model=32, n_layers=layers, n_heads=2, max_seq_len=32, d_ff=64,
                    ffn=[{"kind": "mole", "num_experts": 4, "d_ff": 48}] * layers)
    return GPT(cfg).eval()


def test_train_form_equals_naive_per_token_experts():
    torch.manual_seed(0)
    m = MoLE(16, 32, num_experts=3, expert_d_ff=24).double()
    emb = torch.nn.Embedding(50, 16).double()
    ids = torch.randint(0, 10, (2, 9))  # many repeated ids: the unique-id path must gather right
    u = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    y = m(u, token_ids=ids, embeddings=emb(ids))
    g = torch.softmax(m.router(u).float(), -1).double()
    want = m.shared(u).clone()
    for b in range(2):
        for t in range(9):
            e = m.expert_norm(emb.weight[ids[b, t]])
            for j in range(3):
                h = torch.nn.functional.gelu(m.experts.up_proj[j] @ e)
                want[b, t] = want[b, t] + g[b, t, j] * (m.experts.down_proj[j] @ h)
    torch.testing.assert_close(y, want)
    gy = torch.randn_like(y)
    a = torch.autograd.grad(y, [u, *m.parameters(), emb.weight], gy)
    b = torch.autograd.grad(want, [u, *m.parameters(), emb.weight], gy)
    for x1, x2 in zip(a, b):  # the router's softmax runs in fp32, as in the paper
        torch.testing.assert_close(x1, x2, atol=1e-6, rtol=1e-5)


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
    from moekit.mole import dequantize, quantize

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
    from moekit.mole import load_served

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
    from moekit.mole import load_served

    model = _model()
    model.save(tmp_path / "ckpt")
    reparameterize(model, tmp_path / "table", progress=False)
    loaded = load_served(tmp_path / "ckpt", tmp_path / "table")
    assert loaded.head.weight is loaded.embed.weight
