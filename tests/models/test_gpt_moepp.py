"""GPT with MoE++ layers: the gating residual flows layer to layer (prefill and cached decoding),
save/load, cached generation, active parameters, initialisation of the constant experts."""

import math

import pytest
import torch

import moekit
from moekit.models import GPT, GPTConfig

BASE = GPTConfig(vocab_size=61, d_model=16, n_layers=4, n_heads=2, max_seq_len=32, d_ff=32)
MOEPP = {"kind": "moe", "num_experts": 4, "d_ff": 16, "router": "moepp", "router_args": {"k": 2},
         "zero_experts": 1, "copy_experts": 1, "constant_experts": 2}
# MoE++, a dense layer between (the residual skips it), MoE++ with the code's router and gating
CFG = GPTConfig(**{**BASE.to_dict(), "ffn": [
    MOEPP, {"kind": "dense"}, MOEPP,
    {**MOEPP, "router_args": {"k": 2, "mlp": True, "renormalize_zero": True}}]})


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def _capture_residuals(model):
    """Per MoE++ layer, the gate_residual its router received at each call."""
    seen = {i: [] for i, b in enumerate(model.blocks) if isinstance(b.ffn, moekit.MoE)}
    for i in seen:
        model.blocks[i].ffn.gate.register_forward_pre_hook(
            lambda _m, _a, kw, i=i: seen[i].append(kw.get("gate_residual")), with_kwargs=True)
    return seen


def _logits_after_each_layer(model):
    out = {i: [] for i, b in enumerate(model.blocks) if isinstance(b.ffn, moekit.MoE)}
    for i in out:
        model.blocks[i].ffn.register_forward_hook(lambda m, _a, _y, i=i: out[i].append(m.last_routing.logits))
    return out


def test_each_moe_layer_gets_the_previous_moe_layers_post_residual_logits_in_prefill_and_decoding():
    model = _model()
    seen, logits = _capture_residuals(model), _logits_after_each_layer(model)
    prompt = torch.randint(0, 61, (2, 5))
    model.generate(prompt, 3)
    assert len(seen[0]) == 3  # the prefill and two cached steps
    for step in range(3):
        assert seen[0][step] is None  # the first MoE layer has no previous one
        assert torch.equal(seen[2][step], logits[0][step])  # through the dense layer 1
        assert torch.equal(seen[3][step], logits[2][step])
    assert seen[2][1].shape == (2, 8)  # a cached step: one token per row, all 8 experts
    # the residual changes the routing: without it layer 2 scores W x alone
    x = torch.randn(10, 16)
    gate = model.blocks[2].ffn.gate
    torch.testing.assert_close(gate(x, gate_residual=torch.ones(10, 8)).logits,
                               gate(x).logits + gate.residual_weight.sum(1), rtol=1e-5, atol=1e-6)


def test_generate_with_the_cache_equals_the_greedy_loop_without_it():
    model = _model(1)
    prompt = torch.randint(0, 61, (3, 4))
    out = model.generate(prompt, 9)
    ids = prompt
    for _ in range(9):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_save_load_round_trip(tmp_path):
    model = _model(2)
    model.save(tmp_path / "m")
    loaded = GPT.load(tmp_path / "m").eval()
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "blocks.0.ffn.zc_experts.constant" in a and "blocks.3.ffn.gate.hidden_weight" in a
    ids = torch.randint(0, 61, (2, 12))
    assert torch.equal(model(ids), loaded(ids))


def test_active_params_count_ffn_experts_by_their_assignments():
    model = _model(3)
    ids = torch.randint(0, 61, (2, 10))
    model(ids)
    want = model.num_params()
    for b in model.blocks:
        if isinstance(b.ffn, moekit.MoE):
            T, k, E = 20, 2, 4
            n_ffn = T * k - b.ffn.last_zc_routing.num_assignments  # dropless top-2 over all the experts
            experts = sum(p.numel() for p in b.ffn.experts.parameters())
            want -= experts - int(experts * n_ffn / (T * E))
    assert model.active_params() == want
    stats = moekit.routing_stats(model)
    assert all(s.mean_all_experts_per_token == 2.0 for s in stats.values())
    assert any(s.mean_experts_per_token < 2.0 for s in stats.values())


def test_the_model_init_leaves_the_constant_experts_and_routers_at_their_own_init():
    model = _model(4)
    zc = model.blocks[0].ffn.zc_experts
    assert float(zc.constant.detach().std()) > 0.5  # N(0, 1), not the model's N(0, 0.02)
    assert float(zc.constant_gate.detach().abs().max()) <= 1 / math.sqrt(16)
    assert float(zc.constant_gate.detach().std()) > 0.1


def test_with_moe_takes_the_zero_computation_counts_and_trains():
    cfg = BASE.with_moe(4, router="moepp", zero_experts=1, copy_experts=1, constant_experts=1, every=2)
    assert cfg.ffn[1]["zero_experts"] == 1 and cfg.ffn[0] == {"kind": "dense"}
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(5)
    model = GPT(cfg)
    ids = torch.randint(0, 61, (2, 9))
    loss = model.loss(ids[:, :-1], ids[:, 1:]) + moekit.aux_loss(model)
    loss.backward()
    gate = model.blocks[3].ffn.gate
    assert gate.residual_weight.grad is not None and gate.residual_weight.grad.abs().sum() > 0
    assert float(moekit.aux_loss(model).detach()) > 0
    with pytest.raises(ValueError, match="do not add up|zero_experts"):
        GPT(BASE.with_moe(4, router="moepp", zero_experts=-1))
