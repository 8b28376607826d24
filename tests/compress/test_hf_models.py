"""Compression of Hugging Face MoEs beyond Mixtral (Qwen2-MoE, Qwen3-MoE, OLMoE): pruning keeps the
architecture (plain transformers loads the saved folder and computes the same logits); merged,
quantized or unevenly pruned models are saved in moekit's format, which moekit.load rebuilds exactly
and transformers refuses."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

import moekit
from moekit.compress import compress, mcmoe, prune_layer, sync_config
from moekit.convert import from_hf, save
from moekit.convert.hf import patch_hf_model
from moekit.layer import MoE
from moekit.loader import describe

V, D, E = 64, 16, 4
_SMALL = dict(vocab_size=V, hidden_size=D, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
              head_dim=8, max_position_embeddings=64, num_experts_per_tok=2, eos_token_id=None, pad_token_id=None,
              bos_token_id=None)
#: architecture -> (config class, the config field transformers 5 keeps E in, extra config entries)
ARCHS = {
    "qwen2_moe": (transformers.Qwen2MoeConfig, "num_experts",
                  dict(num_hidden_layers=3, num_experts=E, moe_intermediate_size=8,
                       shared_expert_intermediate_size=12, mlp_only_layers=[0], decoder_sparse_step=1)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, "num_local_experts",
                  dict(num_hidden_layers=2, num_experts=E, moe_intermediate_size=8)),
    "olmoe": (transformers.OlmoeConfig, "num_experts", dict(num_hidden_layers=2, num_experts=E)),
}


def _hf(arch: str, norm: bool = False, seed: int = 0) -> torch.nn.Module:
    cfg_cls, _, extra = ARCHS[arch]
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg_cls(**_SMALL, **extra, norm_topk_prob=norm)).eval()


def _batches(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (2, 8), generator=g) for _ in range(2)]


def _run(m, b):
    return m(input_ids=b)


IDS = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(2))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each architecture saved by plain transformers (Qwen-MoE routers renormalising, OLMoE's not)."""
    root = tmp_path_factory.mktemp("hf")
    for arch in ARCHS:
        _hf(arch, norm=arch != "olmoe").save_pretrained(root / arch)
    return root


@pytest.mark.parametrize("method", ["reap", "prune-count"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_pruning_saves_the_architecture_itself_which_plain_transformers_loads(folders, tmp_path, arch, method):
    model = moekit.load(folders / arch)
    compress(model, method, _batches(), _run, num_experts=3)
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    _, field, _ = ARCHS[arch]
    assert saved["model_type"] == arch and saved[field] == 3 and saved["num_experts_per_tok"] == 2
    assert saved["norm_topk_prob"] == (arch != "olmoe")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    orig = transformers.AutoModelForCausalLM.from_pretrained(folders / arch).eval()
    blocks = [m for m in plain.modules() if type(m).__name__.endswith("SparseMoeBlock")]
    assert len(blocks) == ARCHS[arch][2]["num_hidden_layers"] - (arch == "qwen2_moe")
    assert all(b.gate.weight.shape == (3, D) and b.experts.gate_up_proj.shape[0] == 3 for b in blocks)
    torch.testing.assert_close(_logits(plain), _logits(model), atol=1e-5, rtol=1e-5)
    if arch == "qwen2_moe":  # the dense layer and the gated shared experts come through untouched
        dense, old = plain.model.layers[0].mlp, orig.model.layers[0].mlp
        assert type(dense).__name__ == "Qwen2MoeMLP"
        torch.testing.assert_close(dense.up_proj.weight, old.up_proj.weight, atol=0, rtol=0)
        for i in (1, 2):
            new, was = plain.model.layers[i].mlp, orig.model.layers[i].mlp
            torch.testing.assert_close(new.shared_expert_gate.weight, was.shared_expert_gate.weight, atol=0, rtol=0)
            torch.testing.assert_close(new.shared_expert.down_proj.weight, was.shared_expert.down_proj.weight,
                                       atol=0, rtol=0)


def _naive(block, x: torch.Tensor, keep: list[int], norm: bool) -> torch.Tensor:
    """A block of only the experts ``keep``, computed by hand from the HF block's weights: softmax over the
    kept experts' logits, top-k, (renormalised,) SwiGLU experts, plus the gated shared expert if any."""
    logits = x @ block.gate.weight[keep].t()
    w, idx = F.softmax(logits, dim=-1).topk(block.gate.top_k, dim=-1)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(w.shape[1]):
            e = keep[int(idx[t, j])]
            g, u = (block.experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += w[t, j] * (block.experts.down_proj[e] @ (F.silu(g) * u))
    if hasattr(block, "shared_expert"):
        out += torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return out


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_pruned_layer_computes_the_original_block_on_tokens_routed_to_kept_experts(arch, norm):
    model = _hf(arch, norm)
    block = next(m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock"))
    keep = [0, 2, 3]
    pruned = prune_layer(from_hf(block), keep)
    x = torch.randn(400, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        top = (x @ block.gate.weight.t()).topk(2, dim=-1).indices
        mine = ~(top == 1).any(-1)  # the tokens none of whose 2 experts was cut
        assert mine.sum() > 50
        got = pruned(x[mine])
        torch.testing.assert_close(got, _naive(block, x[mine], keep, norm), atol=1e-5, rtol=1e-5)
        if norm:  # renormalised weights do not depend on the cut experts: the unpruned block's output
            torch.testing.assert_close(got, block(x[mine][None])[0], atol=1e-5, rtol=1e-5)
        else:  # without renormalisation the kept experts' weights grow by the share the cut ones had
            assert not torch.allclose(got, block(x[mine][None])[0], atol=1e-4)


def _merged(model):
    return compress(model, "hc-smoe", _batches(), _run, num_experts=2)


def _quantized(model):
    mcmoe(model, _batches(), _run, bits=2.5, group=8)
    return model


def _uneven(model):
    """Layers pruned to 3 and 2 experts, as global pruning may leave them."""
    for (name, moe), keep in zip([(n, m) for n, m in model.named_modules() if isinstance(m, MoE)], [[0, 1, 3], [2, 3]]):
        model.set_submodule(name, prune_layer(moe, keep))
    sync_config(model)
    return model


@pytest.mark.parametrize("arch,shrink,what", [("qwen2_moe", _merged, "grouped"), ("olmoe", _quantized, "quantized"),
                                              ("qwen3_moe", _uneven, "uneven"), ("qwen2_moe", _quantized, "quantized")])
def test_what_transformers_cannot_hold_is_saved_in_moekit_format_and_loads_back_exactly(folders, tmp_path, arch,
                                                                                       shrink, what):
    model = shrink(moekit.load(folders / arch))
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if what == "uneven":
        assert len({m.num_experts for m in moes}) > 1
    model.save_pretrained(tmp_path / "out")  # moekit.load binds moekit's saver: auto picks moekit's format
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "moekit"
    got = moekit.load(tmp_path / "out")
    torch.testing.assert_close(_logits(got), _logits(model), atol=1e-6, rtol=0)
    assert [m.num_experts for m in got.modules() if isinstance(m, MoE)] == [m.num_experts for m in moes]
    assert [type(m.gate).__name__ for m in got.modules() if isinstance(m, MoE)] == [type(m.gate).__name__ for m in moes]
    with pytest.raises(ValueError, match="moekit"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert "Hugging Face MoE compressed by an unrecorded method (moekit format)" in describe(tmp_path / "out").describe()
    save(got, tmp_path / "again")  # a loaded one saves again, to the same thing
    torch.testing.assert_close(_logits(moekit.load(tmp_path / "again")), _logits(model), atol=1e-6, rtol=0)


def test_a_hand_patched_merged_model_refuses_transformers_save_and_takes_moekits(tmp_path):
    model = patch_hf_model(_hf("qwen3_moe"))
    _merged(model)
    with pytest.raises(ValueError, match=r"merged: routed by GroupedTopK.*moekit.convert.save"):
        model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    save(model, tmp_path / "out")
    torch.testing.assert_close(_logits(moekit.load(tmp_path / "out")), _logits(model), atol=1e-6, rtol=0)


def test_a_damaged_or_edited_folder_is_refused_in_one_line(folders, tmp_path):
    model = _quantized(moekit.load(folders / "olmoe"))
    save(model, tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        moekit.load(tmp_path / "out")
    assert "model.safetensors" in str(e.value) and len(str(e.value).splitlines()) == 1
    save(model, tmp_path / "b")
    record = json.loads((tmp_path / "b" / "moekit_convert.json").read_text())
    name = next(iter(record["moe_layers"]))
    record["moe_layers"][name]["num_experts"] = 9
    (tmp_path / "b" / "moekit_convert.json").write_text(json.dumps(record))
    with pytest.raises(ValueError) as e:
        moekit.load(tmp_path / "b")
    assert "moekit_convert.json" in str(e.value) and len(str(e.value).splitlines()) == 1

