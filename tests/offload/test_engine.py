"""moekit.offload.engine: text generation from a saved model with its experts on disk, ``moekit generate``."""

import pytest
import torch

from moekit.apps.cli.main import main
from moekit.data import train_tokenizer
from moekit.models import GPT, GPTConfig
from moekit.offload import Engine, parse_budget


def test_generate_cli_and_engine(tmp_path, capsys):
    texts = ["the cat sat on the mat and the dog ran to the park"] * 20 + ["a bird sang in the tall green tree"] * 20
    tok, _ = train_tokenizer(texts, 300, cache_dir=tmp_path / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                          d_ff=64).with_moe(8, 2))
    model.save(tmp_path / "run" / "model")
    (tmp_path / "run" / "tokenizer.json").write_text(tok.to_str())
    args = ["generate", "--model", str(tmp_path / "run" / "model"), "--prompt", "the cat", "--max-new-tokens", "8"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--offload", "--budget", "25%", "--prefetch", "gate", "--low-threshold", "0.0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and plain.startswith("the cat")
    assert main(args + ["--offload", "--budget", "25%", "--direct", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "computed from the store" in captured.err
    assert main(args + ["--offload", "--host", "ram", "--direct", "cost"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--direct", "2"]) == 1
    assert "apply to --offload serving; add --offload" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--offload", "--direct", "0"])
    assert "hit rate" in captured.err and (tmp_path / "run" / "model" / "experts" / "manifest.json").exists()
    engine = Engine(tmp_path / "run" / "model", budget=0.5)
    assert "the cat" + engine.generate("the cat", 8) + "\n" == plain
    assert engine.stats().tokens > 0
    engine.close()
    assert parse_budget("25%") == 0.25 and parse_budget("64MiB") == 64 * 2**20 and parse_budget("1.5GB") == 1_500_000_000
    assert parse_budget("0.5") == 0.5 and parse_budget("300000") == 300000 and parse_budget("100%") == 1.0
    for bad in ("lots", "0%", "150%"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
