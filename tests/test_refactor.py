"""Read-ME: PreGate (causal, KV cache), refactoring by domain masks, distillation, tuning, save/load."""

import pytest
import torch

from moekit import MoE
from moekit.convert import load, refactor, save, tune
from moekit.convert.refactor import distillation_loss, distillation_targets, domain_masks, router_loss
from moekit.models import GPT, GPTConfig
from moekit.routers import PreGate, PreGated


def _dense(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, d_ff=64)).eval()


def _domains():
    g = torch.Generator().manual_seed(1)
    return {"low": torch.randint(0, 50, (16, 40), generator=g), "high": torch.randint(50, 100, (16, 40), generator=g)}


def test_pregate_is_causal_and_its_kv_cache_matches_the_full_forward():
    torch.manual_seed(0)
    pg = PreGate(50, 3, d_model=16, n_heads=2, max_seq_len=32).eval()
    ids = torch.randint(0, 50, (2, 12))
    full = pg(ids)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    torch.testing.assert_close(pg(changed)[:, :8], full[:, :8])  # the future never changes the past
    cache = {}
    steps = [pg(ids[:, :5], cache)] + [pg(ids[:, t : t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert pg.route(ids).shape == (2, 12)


def test_pregate_embedding_starts_from_the_lm_embedding():
    pg = PreGate(10, 2, d_model=8, n_heads=2)
    lm = torch.randn(12, 16)
    pg.init_embedding(lm)
    torch.testing.assert_close(pg.embed.weight, lm[:10, :8])


def test_domain_masks_residual_plus_specific_experts_of_equal_width():
    imp = [torch.tensor([9.0, 8, 7, 1, 2, 0, 0, 0]), torch.tensor([9.0, 0, 0, 8, 7, 1, 2, 0])]
    residual, groups = domain_masks(imp, keep=0.5)  # each domain keeps 4 of 8
    assert residual.tolist() == [0, 4]  # top-4: {0, 1, 2, 4} and {0, 3, 4, 6}
    assert groups.shape == (2, 2)
    for i, g in enumerate(groups):
        kept = set(torch.topk(imp[i], 4).indices.tolist())
        assert set(g.tolist()) | set(residual.tolist()) == kept
    with pytest.raises(ValueError, match="same channels"):
        domain_masks([imp[0], imp[0]], keep=0.5)


def test_refactored_layer_equals_the_dense_ffn_masked_to_the_domain_channels():
    dense = _dense()
    model = refactor(dense, _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2})
    x = torch.randn(7, 32)
    for db, mb in zip(dense.blocks, model.blocks):
        moe = mb.ffn
        assert isinstance(moe, MoE) and isinstance(moe.gate, PreGated)
        ffn = db.ffn
        h = torch.nn.functional.silu(ffn.gate_proj(x)) * ffn.up_proj(x)  # the dense hidden activation
        for e in range(moe.num_experts):
            # which dense channels expert e (+ the residual) holds: match rows of the up projection
            rows = torch.cat([moe.shared_expert.up_proj.weight, moe.experts.gate_up_proj[e, moe.d_ff :]])
            ch = [int((ffn.up_proj.weight == r).all(1).nonzero()) for r in rows]
            mask = torch.zeros(64)
            mask[ch] = 1
            want = torch.nn.functional.linear(h * mask, ffn.down_proj.weight)
            got = moe(x, expert_ids=torch.full((7,), e))
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            assert len(ch) == 32  # keep=0.5 of 64 channels per token


def test_distillation_targets_favour_the_expert_whose_channels_fire():
    torch.manual_seed(0)
    moe = MoE(8, 4, 2, router=PreGated(), shared_d_ff=4, check_finite=False)
    with torch.no_grad():
        moe.experts.gate_up_proj[1].mul_(20)  # expert 1's channels are far more active
    dist = distillation_targets(moe, torch.randn(16, 8))
    assert dist.shape == (16, 2) and (dist.argmax(-1) == 1).all()
    logits = torch.zeros(16, 2, requires_grad=True)
    loss = distillation_loss(logits, dist)
    loss.backward()
    assert (logits.grad[:, 1] < 0).all()  # descending the loss raises expert 1's logit


def test_tune_trains_the_router_by_distillation_and_the_experts_by_lm_loss():
    model = refactor(_dense(), _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2})
    ids = torch.randint(0, 100, (8, 24))
    before, _ = router_loss(model, ids)
    gate0 = [p.detach().clone() for p in model.pregate.parameters()]
    expert0 = model.blocks[0].ffn.experts.down_proj.detach().clone()
    hist = tune(model, lambda s: (ids, ids.roll(-1, 1)), rounds=2, router_steps=6, expert_steps=2, router_lr=3e-2,
                progress=False)
    assert [h["phase"] for h in hist] == (["router"] * 6 + ["experts"] * 2) * 2
    after, agree = router_loss(model, ids)
    assert float(after.detach()) < float(before.detach())
    assert 0 <= agree <= 1
    assert any(not torch.equal(a, b) for a, b in zip(gate0, model.pregate.parameters()))
    assert not torch.equal(expert0, model.blocks[0].ffn.experts.down_proj)
    assert all(p.requires_grad for p in model.parameters())


def test_refactored_gpt_saves_loads_and_generates_incrementally(tmp_path):
    model = refactor(_dense(), _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2}).eval()
    assert model.config.pregate["num_experts"] == 2 and model.config.extra["convert"]["method"] == "refactor"
    ids = torch.randint(0, 100, (2, 20))
    save(model, tmp_path / "m")
    again = load(tmp_path / "m")
    torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)
    caches = [{} for _ in model.blocks]
    steps = torch.cat([model(ids[:, :6], caches)] + [model(ids[:, t : t + 1], caches) for t in range(6, 20)], 1)
    torch.testing.assert_close(steps, model(ids), atol=1e-5, rtol=1e-5)


def test_refactored_hf_model_routes_whole_sequences_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    model = refactor(dense, _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2}).eval()
    ids = torch.randint(0, 100, (2, 12))
    out = model(input_ids=ids).logits
    save(model, tmp_path / "hf")
    torch.testing.assert_close(load(tmp_path / "hf")(input_ids=ids).logits, out, atol=0, rtol=0)
    hist = tune(model, lambda s: (ids, ids), rounds=1, router_steps=2, expert_steps=2,
                lm_loss=lambda m, x, y: m(input_ids=x, labels=x).loss, progress=False)
    assert len(hist) == 4
    with pytest.raises(ValueError, match="whole sequences"):
        model(input_ids=ids[:, -1:], past_key_values=model(input_ids=ids, use_cache=True).past_key_values)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 domain"):
        refactor(_dense(), {"one": torch.randint(0, 100, (16, 40))})
    with pytest.raises(ValueError, match="keep must lie in"):
        refactor(_dense(), _domains(), keep=1.0)
    with pytest.raises(ValueError, match="calibration text too small"):
        refactor(_dense(), {"a": torch.randint(0, 100, (1, 8)), "b": torch.randint(0, 100, (1, 8))})
    moe = MoE(8, 4, 2, router=PreGated(), check_finite=False)
    with pytest.raises(ValueError, match="needs expert_ids"):
        moe(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 2\)"):
        moe(torch.randn(3, 8), expert_ids=torch.tensor([0, 1, 2]))
    cfg = GPTConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, d_ff=32).with_moe(
        num_experts=2, k=1, router="pregate", router_args={})
    with pytest.raises(ValueError, match="has no PreGate"):
        GPT(cfg)(torch.randint(0, 50, (1, 4)))
