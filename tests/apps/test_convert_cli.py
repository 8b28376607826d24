"""`moekit convert` end to end on a tiny GPT checkpoint and JSONL text with two languages."""

import json
import random
import re

import pytest
import torch
import transformers

from moekit.apps.cli.main import main
from moekit.convert import load
from moekit.data import load_tokenizer
from moekit.models import GPT, GPTConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moekit.data import load_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("convert")
    rng = random.Random(0)
    words = {"xx": ["alpha", "beta", "gamma", "delta", "omega"], "yy": ["uno", "dos", "tres", "cuatro", "cinco"]}
    with open(root / "text.jsonl", "w") as f:
        for i in range(400):
            lang = "xx" if i % 2 else "yy"
            text = " ".join(rng.choice(words[lang]) for _ in range(60))
            f.write(json.dumps({"text": text, "title": f"d{i}", "language": lang}) + "\n")
    docs = load_corpus(str(root / "text.jsonl"))
    tok, _ = train_tokenizer([d.text for d in docs], vocab_size=300, cache_dir=root / "cache")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                  d_ff=64)).save(root / "dense")
    (root / "dense" / "tokenizer.json").write_text(tok.to_str())  # the user's own file beside the model
    return root


@pytest.mark.parametrize("method,extra", [
    ("partition", ["--experts", "4", "--grouping", "cluster", "--fit-router", "--tune-steps", "2"]),
    ("refactor", ["--domains", "language", "--rounds", "1", "--router-steps", "2", "--tune-steps", "2"]),
    ("upcycle", ["--experts", "2"]),
    ("prune", ["--keep", "0.5"]),
])
def test_convert_command(setup, method, extra, tmp_path, capsys):
    out = tmp_path / method
    argv = ["convert", "--method", method, "--model", str(setup / "dense"), "--out", str(out), "--data",
            str(setup / "text.jsonl"), "--calibration-tokens", "2048", "--seq-len", "32", "--batch-size", "4",
            "--no-progress", *extra]
    assert main(argv) == 0
    assert f"{method}:" in capsys.readouterr().out
    model = load(out)
    assert model.config.extra["convert"]["method"] == method
    assert model(torch.randint(0, 100, (1, 8))).shape[-1] == model.config.vocab_size
    assert (out / "tokenizer.json").read_bytes() == (setup / "dense" / "tokenizer.json").read_bytes()


def _argv(setup, method, model, out, *extra):
    return ["convert", "--method", method, "--model", str(model), "--out", str(out), "--data",
            str(setup / "text.jsonl"), "--calibration-tokens", "512", "--seq-len", "32", "--no-progress", *extra]


def _same_logits(moekit_model, folder, ids, cls):
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(plain).__name__ == cls
    with torch.no_grad():
        want = moekit_model(ids) if isinstance(moekit_model, GPT) else moekit_model(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_convert_a_gpt_to_a_hugging_face_mixtral(setup, tmp_path, capsys):
    out = tmp_path / "mixtral"
    assert main(_argv(setup, "upcycle", setup / "dense", out, "--experts", "4", "--format", "hf")) == 0
    assert f"saved to {out} as MixtralForCausalLM, which transformers loads too" in capsys.readouterr().out
    ids = torch.randint(0, 300, (2, 12))
    _same_logits(load(out), out, ids, "MixtralForCausalLM")
    tok = load_tokenizer(setup / "dense" / "tokenizer.json")
    text = "alpha beta uno dos"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tok.encode(text).ids


@pytest.fixture(scope="module")
def hf_llama(setup):
    """A Hugging Face Llama folder as transformers writes it, with its fast tokenizer's files."""
    tok = load_tokenizer(setup / "dense" / "tokenizer.json")
    folder = setup / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=tok.get_vocab_size(), max_position_embeddings=64)).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fmt,model_type", [("auto", "mixtral"), ("moekit", "moekit")])
def test_convert_a_hugging_face_llama_keeps_its_tokenizer(setup, hf_llama, fmt, model_type, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(setup, "upcycle", hf_llama, out, "--experts", "2", "--format", fmt)) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    if fmt == "auto":
        assert "as MixtralForCausalLM" in capsys.readouterr().out
        _same_logits(load(out), out, torch.randint(0, 300, (2, 12)), "MixtralForCausalLM")
    else:
        assert "in moekit's format" in capsys.readouterr().out
        with pytest.raises(ValueError, match="model type `moekit`"):
            transformers.AutoModelForCausalLM.from_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf_llama / name).read_bytes()
    text = "gamma delta tres"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(hf_llama)(text)["input_ids"]


def test_convert_command_errors(setup, tmp_path, capsys):
    assert main(["convert", "--method", "partition", "--experts", "5", "--model", str(setup / "dense"),
                 "--out", str(tmp_path / "x"), "--data", str(setup / "text.jsonl"), "--no-progress"]) == 1
    assert re.fullmatch(r"moekit convert: error: .*does not divide d_ff=64.*\n", capsys.readouterr().err)
    assert main(["convert", "--method", "prune", "--model", str(tmp_path), "--out", str(tmp_path / "y"),
                 "--no-progress"]) == 1
    assert "no readable config.json" in capsys.readouterr().err
    assert main(_argv(setup, "partition", setup / "dense", tmp_path / "z", "--experts", "4", "--format", "hf")) == 1
    assert capsys.readouterr().err == ("moekit convert: error: --format hf: partition routes with sigmoid_ste; only "
                                       "top-k routing (--router topk) maps onto a transformers architecture: use "
                                       "--format auto or moekit\n")
    assert main(_argv(setup, "prune", setup / "dense", tmp_path / "z", "--format", "hf")) == 1
    assert "--format hf: prune has no router; only top-k routing" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
