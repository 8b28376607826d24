"""`moekit convert` end to end on a tiny GPT checkpoint and JSONL text with two languages."""

import json
import random
import re

import pytest
import torch

from moekit.apps.cli.main import main
from moekit.convert import load
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


def test_convert_command_errors(setup, tmp_path, capsys):
    assert main(["convert", "--method", "partition", "--experts", "5", "--model", str(setup / "dense"),
                 "--out", str(tmp_path / "x"), "--data", str(setup / "text.jsonl"), "--no-progress"]) == 1
    assert re.fullmatch(r"moekit convert: error: .*does not divide d_ff=64.*\n", capsys.readouterr().err)
    assert main(["convert", "--method", "prune", "--model", str(tmp_path), "--out", str(tmp_path / "y"),
                 "--no-progress"]) == 1
    assert "no config.json" in capsys.readouterr().err
