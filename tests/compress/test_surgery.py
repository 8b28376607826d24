"""Pruning and merging one layer against the original layer and naive per-token sums; compressed
models that save, load and export with the same outputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from moekit import MoE
from moekit.compress import compress, dedup_bytes, frequency_coeffs, merge_layer, prune_layer
from moekit.convert import export_hf, patch_hf_model, unpatch_hf_model
from moekit.models import GPT, GPTConfig
from moekit.routers import GroupedTopK, TopK


def _layer(E=5, k=2, renorm=True, seed=0):
    torch.manual_seed(seed)
    return MoE(4, 6, E, router=TopK(k=k, renormalize=renorm), shared_d_ff=3, shared_gate=True).eval()


def _shared(moe, x):
    s = moe.shared_expert
    h = s.down_proj(F.silu(s.gate_proj(x)) * s.up_proj(x))
    return torch.sigmoid(moe.shared_expert_gate(x)) * h


def _ffn(moe, e, x):
    gate, up = (x @ moe.experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ moe.experts.down_proj[e].T


@torch.no_grad()
def test_pruned_layer_equals_the_original_on_tokens_routed_only_to_kept_experts():
    moe = _layer()
    keep = [3, 0, 2]
    small = prune_layer(moe, torch.tensor(keep))
    assert small.num_experts == 3 and small.gate.k == 2 and small.shared_expert is not None
    assert torch.equal(small.gate.weight, moe.gate.weight[[0, 2, 3]])
    assert torch.equal(small.experts.down_proj[1], moe.experts.down_proj[2])
    x = torch.randn(300, 4)
    r = moe.gate(x)
    picks = r.expert.view(300, 2)
    only_kept = torch.isin(picks, torch.tensor(keep)).all(-1)
    assert 20 < int(only_kept.sum()) < 300
    torch.testing.assert_close(small(x)[only_kept], moe(x)[only_kept], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(small(x)[~only_kept], moe(x)[~only_kept], atol=1e-4)
    assert prune_layer(moe, [4]).gate.k == 1  # k = min(k, E')
    assert prune_layer(moe, [1, 1, 0]).num_experts == 2
    with pytest.raises(ValueError, match=r"keep must name experts in \[0, 5\)"):
        prune_layer(moe, [5])
    with pytest.raises(ValueError, match="router must be moekit's TopK"):
        prune_layer(merge_layer(moe, [0, 1, 0, 1, 2], torch.ones(5)), [0])


def test_merging_two_experts_with_known_frequencies_gives_their_weighted_average():
    moe = _layer(E=3)
    groups = [0, 1, 0]
    coeffs = frequency_coeffs(groups, torch.tensor([30, 7, 10]))
    assert coeffs.tolist() == pytest.approx([0.75, 1.0, 0.25])
    merged = merge_layer(moe, groups, coeffs)
    w = moe.experts.gate_up_proj.detach()
    torch.testing.assert_close(merged.experts.gate_up_proj[0], 0.75 * w[0] + 0.25 * w[2])
    torch.testing.assert_close(merged.experts.gate_up_proj[1], w[1])
    d = moe.experts.down_proj.detach()
    torch.testing.assert_close(merged.experts.down_proj[0], 0.75 * d[0] + 0.25 * d[2])
    assert torch.equal(merged.gate.weight, moe.gate.weight)  # the router keeps its E rows
    assert isinstance(merged.gate, GroupedTopK) and merged.num_experts == 2


@pytest.mark.parametrize("renorm", [True, False])
@torch.no_grad()
def test_merged_layer_equals_a_naive_per_token_sum_over_groups(renorm):
    moe = _layer(E=5, k=3, renorm=renorm)
    groups = [0, 1, 0, 2, 1]
    merged = merge_layer(moe, groups, torch.tensor([0.5, 0.2, 0.5, 1.0, 0.8]))
    x = torch.randn(50, 4)
    want = torch.zeros(50, 4)
    for t in range(50):
        p, ids = torch.softmax(x[t] @ moe.gate.weight.T, -1).topk(3)
        if renorm:
            p = p / p.sum()
        for pe, e in zip(p, ids.tolist()):
            want[t] += pe * _ffn(merged, groups[e], x[t])
    torch.testing.assert_close(merged(x), want + _shared(moe, x), atol=1e-5, rtol=1e-5)


def test_dedup_bytes_counts_each_storage_once():
    moe = _layer(E=4)
    merged = merge_layer(moe, [0, 1, 1, 0], torch.full((4,), 0.5))
    per_expert = (2 * 6 * 4 + 4 * 6) * 4
    group_map = 4 * 8  # the router's int64 expert -> group map
    assert dedup_bytes(moe) - dedup_bytes(merged) == 2 * per_expert - group_map
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3, bias=False))
    tied[1].weight = tied[0].weight
    assert dedup_bytes(tied) == 9 * 4
    base = torch.zeros(10)
    views = torch.nn.Module()
    views.a, views.b = torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[4:])
    views.register_buffer("c", base[2:6])
    assert dedup_bytes(views) == 10 * 4  # three views of one storage


def _gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, d_ff=32).with_moe(4, k=2)
    return GPT(cfg).eval()


@pytest.mark.parametrize("method,settings", [("prune-count", {"num_experts": 3, "scope": "global"}),
                                             ("hc-smoe", {"num_experts": 2, "linkage": "single"})])
def test_a_compressed_gpt_saves_and_loads_with_identical_outputs(tmp_path, method, settings):
    model = _gpt()
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    compress(model, method, batches, **settings)
    for block, spec in zip(model.blocks, model.config.ffn):
        assert spec["num_experts"] == block.ffn.num_experts and spec["router"] == block.ffn.gate.name
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        want = model(ids)
    back = GPT.load(model.save(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(back(ids), want)


def test_a_pruned_gpt_exports_to_a_mixtral_plain_transformers_runs(tmp_path):
    import transformers

    model = _gpt()
    compress(model, "prune-count", [torch.randint(0, 64, (2, 16))], num_experts=3)
    export_hf(model, tmp_path / "out")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.num_local_experts == 3
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def test_a_pruned_hf_mixtral_is_still_a_mixtral(tmp_path):
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, num_local_experts=6, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).eval()
    patch_hf_model(model)
    batches = [torch.randint(0, 128, (2, 12)) for _ in range(2)]
    compress(model, "reap", batches, num_experts=4)
    assert model.config.num_local_experts == 4
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "patched")  # the patched model saves as a Mixtral too
    with torch.no_grad():
        got = MixtralForCausalLM.from_pretrained(tmp_path / "patched").eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unpatch_hf_model(model)
    assert not any(isinstance(m, MoE) for m in model.modules())
    model.save_pretrained(tmp_path / "pruned")
    plain = MixtralForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert plain.config.num_local_experts == 4
    assert plain.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["reap", "naee", "hc-smoe"])
def test_compression_runs_on_cuda_and_equals_the_same_model_on_cpu(method):
    model = _gpt().cuda()
    compress(model, method, [torch.randint(0, 64, (2, 16), device="cuda")], num_experts=2)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        got = model(ids.cuda()).cpu()
        want = copy.deepcopy(model).cpu()(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
