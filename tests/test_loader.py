"""moekit.load / load_tokenizer / generate: every model kind from its folder, equal to the model that was
saved; generation under the same options for a moekit GPT and a transformers model, against a
step-by-step loop over full forward passes."""

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import moekit
from moekit.convert import partition, upcycle
from moekit.convert import save as save_converted
from moekit.loader import describe, generate, load, load_tokenizer
from moekit.models import GPT, GPTConfig
from moekit.models.mole import reparameterize
from moekit.ops.sampling import Sampling

VOCAB = 64
EOS = "<|endoftext|>"
HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=64)


def _tokenizer() -> Tokenizer:
    """A word-level tokenizer over a fixed vocabulary (ids 0..VOCAB-1), with moekit's end-of-text token."""
    words = [EOS, "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([EOS])
    return tok


def _gpt(ffn=None, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=64,
                         ffn=ffn)).eval()


def _ids(T=7, B=2):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_a_moekit_gpt_with_its_tokenizer(tmp_path):
    model = _gpt(GPTConfig(vocab_size=VOCAB).with_moe(4, 2).ffn[:2])
    model.save(tmp_path / "m", files={"tokenizer.json": _tokenizer().to_str()})
    assert describe(tmp_path / "m").kind == "gpt"
    loaded = moekit.load(tmp_path / "m")
    assert isinstance(loaded, GPT)
    torch.testing.assert_close(_logits(loaded, _ids()), _logits(model, _ids()), rtol=0, atol=0)
    tok = load_tokenizer(tmp_path / "m")
    assert tok.eos == [0] and tok.encode("w3 w4") == [5, 6] and tok.decode([5, 6]) == "w3 w4"


def test_a_mole_model_is_served_from_its_table(tmp_path):
    model = _gpt([{"kind": "mole", "num_experts": 4, "d_ff": 48}] * 2)
    model.save(tmp_path / "run" / "model")
    assert describe(tmp_path / "run" / "model").table is None  # no table yet: the train form
    assert "train form" in describe(tmp_path / "run" / "model").describe()
    reparameterize(model, tmp_path / "run" / "mole_table", dtype=torch.float32, progress=False)
    info = describe(tmp_path / "run" / "model")
    assert info.kind == "mole" and info.table == tmp_path / "run" / "mole_table"
    served = load(tmp_path / "run" / "model")
    assert type(served.blocks[0].ffn).__name__ == "MoLELookup"
    torch.testing.assert_close(_logits(served, _ids()), _logits(model, _ids()), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="table .*nowhere: no such folder"):
        load(tmp_path / "run" / "model", table=tmp_path / "nowhere")


def test_a_converted_model_in_moekit_format(tmp_path):
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).eval()
    conv = partition(dense, 4).eval()
    save_converted(conv, tmp_path / "c")
    assert describe(tmp_path / "c").kind == "converted"
    loaded = load(tmp_path / "c")
    torch.testing.assert_close(_logits(loaded, _ids()), _logits(conv, _ids()), rtol=1e-6, atol=1e-6)


def test_a_conversion_saved_hugging_face_native(tmp_path):
    torch.manual_seed(0)
    conv = upcycle(transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).eval(), 4, k=2).eval()
    save_converted(conv, tmp_path / "c")
    info = describe(tmp_path / "c")
    assert info.kind == "converted" and info.architecture == "MixtralForCausalLM"
    assert "Hugging Face-native MixtralForCausalLM" in info.describe()
    torch.testing.assert_close(_logits(load(tmp_path / "c"), _ids()), _logits(conv, _ids()), rtol=1e-5, atol=1e-5)


def test_hugging_face_folders_dense_and_moe(tmp_path):
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).eval()
    dense.save_pretrained(tmp_path / "llama")
    moe = transformers.MixtralForCausalLM(transformers.MixtralConfig(**HF, num_local_experts=4,
                                                                     num_experts_per_tok=2)).eval()
    moe.save_pretrained(tmp_path / "mixtral")
    for want, folder in ((dense, "llama"), (moe, "mixtral")):
        assert describe(tmp_path / folder).kind == "hf"
        got = load(tmp_path / folder)
        torch.testing.assert_close(_logits(got, _ids()), _logits(want, _ids()), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, moekit.MoE) for m in load(tmp_path / "mixtral").modules()) == 2


def _greedy_by_hand(model, ids, n, eos=None):
    for _ in range(n):
        nxt = _logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if eos is not None and bool((nxt == eos).all()):
            break
    return ids


def test_generate_is_the_same_for_a_gpt_and_a_transformers_model(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).eval()
    gpt = _gpt()
    ids = _ids(B=1)
    for model in (hf, gpt):
        assert torch.equal(generate(model, ids, 6), _greedy_by_hand(model, ids, 6))
        a = generate(model, ids, 6, Sampling(1.0, top_k=10, top_p=0.9), seed=3)
        b = generate(model, ids, 6, Sampling(1.0, top_k=10, top_p=0.9), seed=3)
        assert torch.equal(a, b) and a.shape == (1, 13)
        first = int(_greedy_by_hand(model, ids, 1)[0, -1])
        assert generate(model, ids, 6, eos_token_id=first).shape == (1, 8)  # stops at the first token


def _sampled_by_hand(model, ids, n, temperature, top_k, top_p, seed):
    """Full forward passes; temperature, top-k, nucleus, one draw from the global generator per step."""
    torch.manual_seed(seed)
    for _ in range(n):
        logits = _logits(model, ids)[:, -1].float() / temperature
        if top_k:
            logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
        p, order = logits.softmax(-1).sort(-1, descending=True)
        drop = (p.cumsum(-1) - p) >= (top_p or 2.0)
        drop[:, 0] = False
        probs = torch.zeros_like(p).scatter(-1, order, p.masked_fill(drop, 0))
        ids = torch.cat([ids, torch.multinomial(probs, 1)], 1)
    return ids


@pytest.mark.parametrize("top_k, top_p", [(None, None), (10, None), (None, 0.8), (12, 0.9)])
def test_sampling_is_the_same_for_a_gpt_and_a_transformers_model(top_k, top_p):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).eval()
    ids = _ids(B=1)
    for model in (hf, _gpt()):
        got = generate(model, ids, 6, Sampling(0.9, top_k, top_p), seed=5)
        assert torch.equal(got, _sampled_by_hand(model, ids, 6, 0.9, top_k, top_p, seed=5))


def test_hf_tokenizer_and_its_eos(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).save_pretrained(tmp_path / "llama")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), eos_token=EOS, unk_token="<unk>")
    fast.save_pretrained(tmp_path / "llama")
    tok = load_tokenizer(tmp_path / "llama")
    assert tok.eos == [0] and tok.encode("w3 w4") == [5, 6] and tok.decode([5, 6, 0]) == "w3 w4"


@pytest.mark.parametrize("make, msg", [
    (lambda p: None, "no such folder"),
    (lambda p: p.mkdir(), "no readable config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text(json.dumps({"hidden": 3}))), "neither a moekit GPT config"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{")), "no readable config.json"),
])
def test_what_is_not_a_model_is_refused_in_one_line(tmp_path, make, msg):
    make(tmp_path / "x")
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        load(tmp_path / "x")


def test_an_unknown_hf_architecture_is_refused_in_one_line(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ValueError, match="transformers cannot load this folder"):
        load(tmp_path / "x")
