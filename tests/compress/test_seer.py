"""SEER-MoE: heavy-hitter pruning, the entropy-regularised fine-tuning loss, top-k adaptation."""

import copy

import pytest
import torch

from moekit import MoE
from moekit.compress import ExpertStats, build_compression, compress, router_entropy, seer_finetune, set_top_k
from moekit.models import GPT, GPTConfig
from moekit.routers import TopK


def _gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, d_ff=32).with_moe(4, k=2)
    return GPT(cfg).eval()


def test_seer_keeps_the_heavy_hitters_by_hard_or_soft_counts():
    torch.manual_seed(0)
    moe = MoE(4, 6, 4, router=TopK(k=2)).eval()
    st = ExpertStats.empty(4, layer="l", k=2)
    st.tokens += torch.tensor([9, 1, 5, 2])
    st.soft += torch.tensor([0.1, 4.0, 0.2, 3.0], dtype=torch.float64)
    for counts, want in [("hard", [0, 2]), ("soft", [1, 3])]:
        out = build_compression("seer", num_experts=2, counts=counts).compress_layer(moe, st)
        assert torch.equal(out.gate.weight, moe.gate.weight[want])
    with pytest.raises(ValueError, match="counts must be 'hard' or 'soft'"):
        build_compression("seer", num_experts=2, counts="both")


def _entropy_by_hand(model):
    hs = []
    for block in model.blocks:
        p = torch.softmax(block.ffn.last_routing.logits, -1)
        hs.append(-(p * p.log()).sum(-1).mean())
    return sum(hs) / len(hs)


def test_seer_finetune_adds_lambda_times_the_router_entropy_and_sharpens_the_router():
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    base = _gpt()
    plain, sharp = copy.deepcopy(base), copy.deepcopy(base)
    base.train()
    with torch.no_grad():
        base.loss(x, y)
    h0 = float(_entropy_by_hand(base))
    assert float(router_entropy(base)) == pytest.approx(h0, rel=1e-6)
    a = seer_finetune(plain, lambda step: (x, y), 6, entropy=0.0, lr=1e-2)
    b = seer_finetune(sharp, lambda step: (x, y), 6, entropy=2.0, lr=1e-2)
    assert b[0] - a[0] == pytest.approx(2.0 * h0, rel=1e-4)
    for m in (plain, sharp):
        with torch.no_grad():
            m.loss(x, y)
    assert float(_entropy_by_hand(sharp)) < float(_entropy_by_hand(plain)) - 0.05
    with pytest.raises(ValueError, match="entropy must lie in"):
        seer_finetune(plain, lambda step: (x, y), 1, entropy=-1.0)


def test_set_top_k_routes_every_layer_to_k_experts_and_survives_save_load(tmp_path):
    model = _gpt()
    compress(model, "seer", [torch.randint(0, 64, (2, 16))], num_experts=3)
    set_top_k(model, 1)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        want = model(ids)
    for block, spec in zip(model.blocks, model.config.ffn):
        r = block.ffn.last_routing
        assert r.num_assignments == r.num_tokens and torch.allclose(r.weight, torch.ones(r.num_tokens))
        assert spec["router_args"]["k"] == 1
    back = GPT.load(model.save(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(back(ids), want)
    with pytest.raises(ValueError, match="k=4 exceeds the 3 experts"):
        set_top_k(model, 4)
    with pytest.raises(ValueError, match="no MoE layer routed by TopK"):
        set_top_k(torch.nn.Linear(2, 2), 1)
