"""Hugging Face-native export (moekit/convert/export.py): plain transformers is the oracle.

Every model's weights are re-drawn large (``_spread``) so that a wrong mapping (a permuted rotary
half, a lost shared expert, another top-k choice) moves the logits far beyond the tolerance."""

import json
import re

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

from moekit import FFN, MoE
from moekit.compress.mcmoe import quantize_attention
from moekit.convert import ConvertedFFN, export_hf, hf_native, load, partition, prune, save, upcycle, why_not_hf_native
from moekit.models import GPT, GPTConfig
from moekit.routers import TopK
from tests.convert.models import HF_SMALL, VOCAB, _dense, _ids, _moes, _spread, _tokenizer
from tests.faults import flip_byte

ATOL = 1e-5
GPT_SMALL = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=64)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids) if isinstance(model, GPT) else model(input_ids=ids).logits


def _plain_logits(folder, ids, cls: str) -> torch.Tensor:
    """Logits of the folder loaded by plain transformers (no moekit code involved), of class ``cls``."""
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(plain).__name__ == cls
    assert not any(isinstance(m, (MoE, ConvertedFFN)) for m in plain.modules())
    return _logits(plain, ids)


def _exported(model: nn.Module, folder, cls: str) -> dict:
    """Export, check the folder's config and that transformers computes the model's logits; the config."""
    assert hf_native(model) == cls and why_not_hf_native(model) is None
    assert export_hf(model, folder) == folder
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [cls]
    ids = _ids(T=12)
    want = _logits(model, ids)
    assert want.std() > 0.3  # logits large enough for the tolerance to mean something
    torch.testing.assert_close(_plain_logits(folder, ids, cls), want, atol=ATOL, rtol=0)
    back = load(folder)  # moekit reads it back: MoE blocks as moekit layers
    assert type(back).__name__ == cls
    if cls != "LlamaForCausalLM":
        assert len(_moes(back)) == config["num_hidden_layers"] - len(config.get("mlp_only_layers", []))
    torch.testing.assert_close(_logits(back, ids), want, atol=ATOL, rtol=0)
    return config


@pytest.mark.parametrize("how", ["partition", "upcycle"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_llama_and_mistral_with_top_k_routers_load_as_mixtral(family, how, tmp_path):
    dense = _dense(family)
    if family == "mistral":  # a window shorter than the sequence: the sliding mask must carry over
        dense.config.sliding_window = 4
    conv = partition(dense, 4, router="topk", router_args={"k": 2}) if how == "partition" else upcycle(dense, 4, k=2)
    config = _exported(_spread(conv).eval(), tmp_path / "out", "MixtralForCausalLM")
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == \
        ((4, 2, 16) if how == "partition" else (4, 2, 64))
    assert config["sliding_window"] == (4 if family == "mistral" else None)


def _qwen2_moe(shared: str) -> nn.Module:
    """A Qwen2 partitioned into top-2 of 4 experts, its layers' shared experts as ``shared`` says."""
    conv = partition(_dense("qwen2"), 4, router="topk", router_args={"k": 2, "renormalize": shared == "none"})
    widths = {"none": (None, None), "gated": (24, 24), "ungated": (24, 24), "mixed": (8, None), "widths": (8, 12)}
    gates = {"gated": (True, True), "mixed": (True, False), "widths": (False, True)}.get(shared, (False, False))
    for cf, width, gate in zip([m for m in conv.modules() if isinstance(m, ConvertedFFN)], widths[shared], gates):
        cf.ffn = MoE(32, 16, 4, router=TopK(2, renormalize=shared == "none"), shared_d_ff=width,
                     shared_gate=gate and width is not None)
    return _spread(conv).eval()


@pytest.mark.parametrize("shared", ["none", "gated", "ungated", "mixed", "widths"])
def test_qwen2_loads_as_qwen2_moe_whatever_its_shared_experts(shared, tmp_path):
    config = _exported(_qwen2_moe(shared), tmp_path / "out", "Qwen2MoeForCausalLM")
    assert config["norm_topk_prob"] is (shared == "none")
    assert config["shared_expert_intermediate_size"] == {"none": 1, "mixed": 8, "widths": 12}.get(shared, 24)
    assert config["qkv_bias"] is True and config["mlp_only_layers"] == []


@pytest.mark.parametrize("dense_layer", [False, True])
@pytest.mark.parametrize("renormalize", [True, False])
def test_qwen3_loads_as_qwen3_moe(renormalize, dense_layer, tmp_path):
    conv = upcycle(_dense("qwen3"), 4, k=2, router_args={"renormalize": renormalize})
    if dense_layer:  # a dense FFN of its own width in layer 1: Qwen3-MoE's mlp_only_layers
        [m for m in conv.modules() if isinstance(m, ConvertedFFN)][1].ffn = FFN(32, 48)
    config = _exported(_spread(conv).eval(), tmp_path / "out", "Qwen3MoeForCausalLM")
    assert config["norm_topk_prob"] is renormalize
    assert config["mlp_only_layers"] == ([1] if dense_layer else [])
    assert config.get("head_dim") == 8 and config["use_sliding_window"] is False
    if dense_layer:
        assert config["intermediate_size"] == 48


@pytest.mark.parametrize("tied", [True, False])
def test_a_dense_gpt_loads_as_llama(tied, tmp_path):
    torch.manual_seed(0)
    gpt = _spread(GPT(GPTConfig(**GPT_SMALL, tie_embeddings=tied, rope_theta=500.0, norm_eps=1e-4))).eval()
    config = _exported(gpt, tmp_path / "out", "LlamaForCausalLM")
    assert config["tie_word_embeddings"] is tied and config["rms_norm_eps"] == 1e-4
    assert config["rope_parameters"]["rope_theta"] == 500.0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied  # a tied head is transformers' to tie


@pytest.mark.parametrize("how", ["config", "upcycle"])
def test_a_top_k_gpt_loads_as_mixtral(how, tmp_path):
    torch.manual_seed(0)
    if how == "config":
        gpt = GPT(GPTConfig(**GPT_SMALL).with_moe(4, 2))
    else:
        gpt = upcycle(GPT(GPTConfig(**GPT_SMALL)), 4, k=2)
    config = _exported(_spread(gpt).eval(), tmp_path / "out", "MixtralForCausalLM")
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert save(gpt, tmp_path / "gpt") == tmp_path / "gpt"  # moekit.convert.save keeps a GPT a GPT
    assert "model_type" not in json.loads((tmp_path / "gpt" / "config.json").read_text())


def _gpt_with(**ffn) -> GPT:
    return GPT(GPTConfig(**GPT_SMALL).with_moe(**ffn))


def _llama_with_attention_bias() -> nn.Module:
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_SMALL, attention_bias=True))
    return upcycle(dense.eval(), 4)


def _qwen3_partly_sliding() -> nn.Module:
    cfg = transformers.Qwen3Config(**HF_SMALL, head_dim=8, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)
    return upcycle(transformers.Qwen3ForCausalLM(cfg).eval(), 4)


NOT_NATIVE = {
    "sigmoid_ste": (lambda: partition(_dense("llama"), 4), "layer 0 routes with SigmoidSTE"),
    "dselect": (lambda: partition(_dense("llama"), 4, router="dselect", router_args={"k": 2}), "routes with DSelectK"),
    "no renormalisation": (lambda: partition(_dense("mistral"), 4, router="topk",
                                             router_args={"k": 2, "renormalize": False}),
                           r"TopK\(renormalize=False\) \(MixtralForCausalLM always renormalises"),
    "scale": (lambda: partition(_dense("llama"), 4, "topk", {"k": 2, "scale": 2.0}), r"TopK\(scale=2.0\)"),
    "capacity": (lambda: upcycle(_dense("qwen3"), 4, router_args={"capacity_factor": 1.0}), "capacity_factor=1.0"),
    "prune": (lambda: prune(_dense("llama"), 0.5), "no MoE layer"),
    "attention bias": (_llama_with_attention_bias, r"attention biases \(attention_bias=True"),
    "gpt2": (lambda: upcycle(_dense("gpt2"), 4), "gpt2 models have no MoE architecture in transformers"),
    "partly sliding": (_qwen3_partly_sliding, "sliding-window attention in some layers only"),
    "not converted": (lambda: _dense("llama"), "LlamaForCausalLM was not converted by moekit.convert"),
    "no lm head": (lambda: upcycle(transformers.LlamaModel(transformers.LlamaConfig(**HF_SMALL)).eval(), 4),
                   r"a LlamaModel \(moekit writes causal LMs"),
    "gpt mixed": (lambda: _gpt_with(num_experts=4, k=2, every=2), r"dense layers \[0\] among MoE ones"),
    "gpt shared": (lambda: _gpt_with(num_experts=4, k=2, shared_d_ff=16),
                   r"layer 0 has a shared expert \(MixtralForCausalLM has none\)"),
    "gpt router": (lambda: _gpt_with(num_experts=4, router="sigmoid_ste", router_args={}), "routes with SigmoidSTE"),
    "gpt pregate": (lambda: GPT(GPTConfig(**GPT_SMALL, pregate={"num_experts": 4, "d_model": 16, "n_heads": 2},
                                          ffn=[{"kind": "pregated", "num_experts": 4, "d_ff": 16}] * 2)),
                    "a PreGate"),
    "gpt widths": (lambda: GPT(GPTConfig(**GPT_SMALL, ffn=[{"kind": "dense"}, {"kind": "dense", "d_ff": 32}])),
                   r"the layers differ in dense FFN width \(\[64, 32\]\)"),
}


@pytest.mark.parametrize("case", list(NOT_NATIVE))
def test_what_does_not_map_is_refused_with_its_reason(case, tmp_path):
    build, reason = NOT_NATIVE[case]
    model = build()
    assert hf_native(model) is None
    assert re.search(reason, why_not_hf_native(model))
    with pytest.raises(ValueError, match=rf"^export_hf: .*{reason}.*; save the model in moekit's format with "
                                         r"moekit.convert.save\(model, path\)$"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_a_moekit_format_folder_refuses_plain_transformers(family, tmp_path):
    conv = partition(_dense(family), 4).eval()  # SigmoidSTE: moekit's format
    save(conv, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "moekit"
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel, transformers.AutoConfig):
        with pytest.raises(ValueError, match="model type `moekit`"):
            auto.from_pretrained(tmp_path / "m")
    # the base class reads config.json without looking at model_type: its vocab_size stops it
    with pytest.raises(Exception, match="vocab_size.*not a transformers model: .*load it with moekit.convert.load"):
        type(conv).from_pretrained(tmp_path / "m")
    back, ids = load(tmp_path / "m"), _ids()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids)[0], conv(input_ids=ids)[0])


def test_router_training_settings_travel_beside_the_hf_config(tmp_path):
    conv = upcycle(_dense("llama"), 4, k=2, router_args={"balance": 0.02, "z_loss": 0.003, "jitter": 0.1})
    export_hf(conv, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["router_aux_loss_coef"] == pytest.approx(0.01)  # balance / k: transformers counts f_e per token
    back = load(tmp_path / "out")
    assert [(m.gate.balance, m.gate.z_loss, m.gate.jitter) for m in _moes(back)] == [(0.02, 0.003, 0.1)] * 2
    export_hf(back, tmp_path / "again")  # a loaded model exports again, the same
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config


def _text_ids(tok_or_folder, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(tok_or_folder)(text)["input_ids"]


@pytest.mark.parametrize("kind", ["tokenizers", "file", "folder", "transformers"])
def test_the_tokenizer_travels_with_the_export(kind, tmp_path):
    tok = _tokenizer(tmp_path / "cache")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(tok.to_str())
    fast.save_pretrained(tmp_path / "hf_tok")
    given = {"tokenizers": tok, "file": tmp_path / "tok" / "tokenizer.json", "folder": tmp_path / "hf_tok",
             "transformers": fast}[kind]
    export_hf(GPT(GPTConfig(**GPT_SMALL)), tmp_path / "out", tokenizer=given)
    listed = json.loads((tmp_path / "out" / "moekit.json").read_text())["files"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(listed)
    text = "mixture of experts routes alpha tokens"
    assert _text_ids(tmp_path / "out", text) == tok.encode(text).ids
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "<|endoftext|>"
    if kind == "file":  # the user's tokenizer.json is kept byte for byte
        assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()


def test_bad_tokenizers_write_nothing(tmp_path):
    gpt = GPT(GPTConfig(**GPT_SMALL))
    with pytest.raises(TypeError, match="tokenizer: expected a path, a tokenizers.Tokenizer or a transformers"):
        export_hf(gpt, tmp_path / "a", tokenizer=42)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer_config.json there"):
        export_hf(gpt, tmp_path / "b", tokenizer=tmp_path / "nowhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_damaged_export_is_caught_by_load(tmp_path):
    export_hf(upcycle(_dense("llama"), 4), tmp_path / "out")
    flip_byte(tmp_path / "out" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: checksum mismatch"):
        load(tmp_path / "out")


def test_export_writes_only_where_moekit_may(tmp_path):
    conv = upcycle(_dense("llama"), 4)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by moekit"):
        export_hf(conv, tmp_path / "theirs")
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["notes.txt"]
    save(partition(_dense("llama"), 4), tmp_path / "ours")  # moekit's format, then HF-native in its place
    export_hf(conv, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "mixtral"


def test_a_gpt_export_carries_its_tokenizers_end_of_text_for_transformers_generate(tmp_path):
    tok = _tokenizer(tmp_path / "tok")
    eos = tok.token_to_id("<|endoftext|>")
    gpt = GPT(GPTConfig(**{**GPT_SMALL, "vocab_size": tok.get_vocab_size()})).eval()
    export_hf(gpt, tmp_path / "out", tok)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == config["pad_token_id"] == eos
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert plain.generation_config.eos_token_id == eos  # transformers' generate stops there
    export_hf(gpt, tmp_path / "bare")  # without a tokenizer nothing is guessed
    assert json.loads((tmp_path / "bare" / "config.json").read_text()).get("eos_token_id") is None


def test_a_gpt_with_packed_attention_is_refused_in_one_line(tmp_path):
    gpt = GPT(GPTConfig(**GPT_SMALL).with_moe(4, 2)).eval()
    quantize_attention(gpt, 4, 16)
    assert hf_native(gpt) is None and "attention projections are packed" in why_not_hf_native(gpt)
    with pytest.raises(ValueError, match="attention projections are packed"):
        export_hf(gpt, tmp_path / "out")
