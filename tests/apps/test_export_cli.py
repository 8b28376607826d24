"""`moekit export`: a saved moekit GPT as a Hugging Face Llama / Mixtral folder, with its tokenizer."""

import re

import pytest
import torch
import transformers

from moekit.apps.cli.main import main
from moekit.data import train_tokenizer
from moekit.models import GPT, GPTConfig


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["alpha beta gamma delta", "uno dos tres cuatro"] * 40
    tok, _ = train_tokenizer(texts, vocab_size=280, cache_dir=tmp_path_factory.mktemp("tok"))
    return tok


def _saved_gpt(folder, tok, **moe) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=64)
    gpt = GPT(config.with_moe(**moe) if moe else config).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.normal_(0, 0.3) if p.dim() >= 2 else p.uniform_(0.8, 1.2)
    gpt.save(folder, files={"tokenizer.json": tok.to_str()})
    return gpt


@pytest.mark.parametrize("moe,cls", [({}, "LlamaForCausalLM"), ({"num_experts": 4, "k": 2}, "MixtralForCausalLM")])
def test_export_a_gpt(tokenizer, moe, cls, tmp_path, capsys):
    gpt = _saved_gpt(tmp_path / "gpt", tokenizer, **moe)
    assert main(["export", "--model", str(tmp_path / "gpt"), "--out", str(tmp_path / "hf")]) == 0
    assert f"to {tmp_path / 'hf'} as {cls}" in capsys.readouterr().out
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(plain).__name__ == cls
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, gpt(ids), atol=1e-5, rtol=0)
    text = "alpha uno gamma tres"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == tokenizer.encode(text).ids


def test_export_errors_are_one_line(tokenizer, tmp_path, capsys):
    _saved_gpt(tmp_path / "mixed", tokenizer, num_experts=4, k=2, every=2)
    assert main(["export", "--model", str(tmp_path / "mixed"), "--out", str(tmp_path / "a")]) == 1
    assert re.fullmatch(r"moekit export: error: export_hf: dense layers \[0\] among MoE ones .*; save the model in "
                        r"moekit's format with moekit.convert.save\(model, path\)\n", capsys.readouterr().err)
    assert not (tmp_path / "a").exists()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x.txt").write_text("x")
    assert main(["export", "--model", str(tmp_path / "mixed"), "--out", str(tmp_path / "theirs")]) == 1
    assert "--out " in capsys.readouterr().err
    gpt = GPT(GPTConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, d_ff=32))
    gpt.save(tmp_path / "lone" / "model")  # no tokenizer in it or beside it: exported all the same, with a warning
    assert main(["export", "--model", str(tmp_path / "lone" / "model"), "--out", str(tmp_path / "b")]) == 0
    assert "moekit export: warning: no tokenizer in" in capsys.readouterr().err
    assert (tmp_path / "b" / "config.json").exists() and not (tmp_path / "b" / "tokenizer.json").exists()
