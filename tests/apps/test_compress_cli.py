"""`moekit compress` end to end on a tiny moekit GPT and a tiny Hugging Face Mixtral (pruned: still a
Mixtral; merged or quantized: moekit's format): the saved model computes what the same compression
done in Python computes; a user's mistakes are one line."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

import moekit
from moekit.apps.cli.main import main
from moekit.compress import compress, dedup_bytes, mcmoe
from moekit.data import TokenStream, by_split, load_corpus
from moekit.layer import MoE
from moekit.loader import describe
from moekit.models import GPT, GPTConfig
from moekit.offload import load_offloaded

SEQ, CALIB, BS = 16, 128, 4  # 8 calibration windows of 16 tokens, in batches of 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moekit.data import train_tokenizer

    root = tmp_path_factory.mktemp("compress")
    rng = random.Random(0)
    words = {"xx": "alpha beta gamma delta omega".split(), "yy": "uno dos tres cuatro cinco".split()}
    langs = ["xx" if i % 2 else "yy" for i in range(300)]
    records = [{"text": " ".join(rng.choice(words[lang]) for _ in range(40)), "title": f"d{i}", "language": lang}
               for i, lang in enumerate(langs)]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    docs = load_corpus(str(root / "text.jsonl"))
    tok, _ = train_tokenizer([d.text for d in docs], vocab_size=300, cache_dir=root / "cache")
    V = tok.get_vocab_size()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, d_ff=32)
    GPT(cfg.with_moe(4, k=2)).save(root / "gpt", files={"tokenizer.json": tok.to_str()})
    GPT(cfg).save(root / "dense", files={"tokenizer.json": tok.to_str()})
    hf = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
                                          num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    hf.save_pretrained(root / "mixtral")
    (root / "mixtral" / "tokenizer.json").write_text(tok.to_str())
    return root, tok


def _argv(root, model, out, method, *extra):
    return ["compress", "--model", str(root / model), "--out", str(out), "--method", method, "--data",
            str(root / "text.jsonl"), "--calibration-tokens", str(CALIB), "--seq-len", str(SEQ), "--batch-size",
            str(BS), "--eval-tokens", "128", "--no-progress", *extra]


def _calibration(root, tok, language=None):
    """The windows the command calibrates on, built here from the text: evenly spread over the training split."""
    docs = [d for d in by_split(load_corpus(str(root / "text.jsonl")))["train"] if language in (None, d.language)]
    return list(TokenStream.from_documents(docs, tok).chunks(SEQ, CALIB // SEQ)[0].split(BS))


@pytest.mark.parametrize("method,extra", [("reap", ["--experts", "2"]),
                                          ("hc-smoe", ["--experts", "3", "--linkage", "single"]),
                                          ("prune-count", ["--experts", "2", "--scope", "global",
                                                           "--domain", "language=xx"])])
def test_a_compressed_gpt_loads_and_equals_the_compression_done_in_python(setup, tmp_path, capsys, method, extra):
    root, tok = setup
    assert main(_argv(root, "gpt", tmp_path / "out", method, *extra)) == 0
    printed = capsys.readouterr().out
    got = moekit.load(tmp_path / "out")
    want = GPT.load(root / "gpt")
    settings = {"num_experts": int(extra[1]), **({"linkage": "single"} if "single" in extra else {}),
                **({"scope": "global"} if "global" in extra else {})}
    compress(want, method, _calibration(root, tok, "xx" if "--domain" in extra else None), **settings)
    ids = torch.randint(0, want.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(got(ids), want(ids), atol=1e-6, rtol=1e-5)
    assert [b.ffn.num_experts for b in got.blocks] == [b.ffn.num_experts for b in want.blocks]
    assert f"{dedup_bytes(GPT.load(root / 'gpt')):,} -> {dedup_bytes(want):,}" in printed
    assert "validation perplexity" in printed and (tmp_path / "out" / "tokenizer.json").exists()


def test_mc_moe_saves_the_quantized_model_and_prints_a_perplexity_computed_by_hand(setup, tmp_path, capsys):
    root, tok = setup
    assert main(_argv(root, "gpt", tmp_path / "q", "mc-moe", "--bits", "2.5", "--group", "16")) == 0
    printed = capsys.readouterr().out
    got = moekit.load(tmp_path / "q")  # the loader tells a quantized folder from its mcmoe.json
    want = GPT.load(root / "gpt")
    mcmoe(want, _calibration(root, tok), bits=2.5, group=16)
    ids = torch.randint(0, want.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(got(ids), want(ids), atol=1e-6, rtol=1e-5)
    val = TokenStream.from_documents(by_split(load_corpus(str(root / "text.jsonl")))["validation"], tok)
    x, y, _ = val.chunks(SEQ, 128 // SEQ)
    with torch.no_grad():
        ppl = math.exp(float(F.cross_entropy(want(x).flatten(0, 1), y.reshape(-1))))
    assert f"-> {ppl:.3f}" in printed
    base = GPT.load(root / "gpt")
    fp32 = sum(p.nbytes for b in base.blocks for p in b.ffn.experts.parameters())
    rest = dedup_bytes(base) - fp32
    assert dedup_bytes(want) - rest < 0.2 * fp32  # 2.5 of 32 bits, plus the groups' scales


def test_a_pruned_mixtral_stays_a_mixtral_and_equals_the_compression_done_in_python(setup, tmp_path):
    root, tok = setup
    assert main(_argv(root, "mixtral", tmp_path / "m", "reap", "--experts", "3")) == 0
    got = moekit.load(tmp_path / "m")
    assert got.config.num_local_experts == 3 and sum(isinstance(m, MoE) for m in got.modules()) == 2
    assert "compressed by reap (Hugging Face-native MixtralForCausalLM)" in describe(tmp_path / "m").describe()
    want = moekit.load(root / "mixtral")
    compress(want, "reap", _calibration(root, tok), lambda m, b: m(input_ids=b), num_experts=3)
    plain = MixtralForCausalLM.from_pretrained(tmp_path / "m").eval()  # transformers alone reads it too
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain(ids).logits, want(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,extra", [("hc-smoe", ["--experts", "3"]), ("mc-moe", ["--bits", "2.5", "--group", "16"])])
def test_a_merged_or_quantized_mixtral_is_saved_in_moekits_format_and_generates(setup, tmp_path, capsys, method,
                                                                                 extra):
    root, tok = setup
    assert main(_argv(root, "mixtral", tmp_path / "m", method, *extra)) == 0
    assert f"Hugging Face MoE compressed by {method} (moekit format)" in capsys.readouterr().out
    got = moekit.load(tmp_path / "m")
    want = moekit.load(root / "mixtral")
    if method == "mc-moe":
        mcmoe(want, _calibration(root, tok), lambda m, b: m(input_ids=b), bits=2.5, group=16)
    else:
        compress(want, method, _calibration(root, tok), lambda m, b: m(input_ids=b), num_experts=3)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=1e-6, rtol=0)
    with pytest.raises(Exception, match="vocab_size.*not a transformers model: .*compressed by moekit"):
        MixtralForCausalLM.from_pretrained(tmp_path / "m")  # not a Mixtral any more: transformers refuses it
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "alpha beta", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "alpha", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("model,method,extra,message", [
    ("gpt", "reap", ["--experts", "1"], "--experts 1 is below the top-k 2"),
    ("gpt", "reap", ["--experts", "4"], "nothing would be removed"),
    ("gpt", "reap", [], "--experts: reap needs the number of experts"),
    ("gpt", "reap", ["--experts", "2", "--bits", "2"], "--bits: reap does not quantize"),
    ("gpt", "hc-smoe", ["--experts", "2", "--scope", "global"], "--scope: hc-smoe takes no scope"),
    ("gpt", "reap", ["--experts", "2", "--domain", "fr"], "expected FIELD=VALUE"),
    ("dense", "reap", ["--experts", "2"], "has no MoE layer to compress"),
    ("gpt", "reap", ["--experts", "2", "--out", "SAME"], "is the --model folder"),
])
def test_a_users_mistake_is_one_line(setup, tmp_path, capsys, model, method, extra, message):
    root, _ = setup
    if "SAME" in extra:
        extra = [str(root / model) if a == "SAME" else a for a in extra]
    assert main(_argv(root, model, tmp_path / "o", method, *extra)) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_unknown_method_or_a_folder_moekit_did_not_write_is_refused(setup, tmp_path, capsys):
    root, _ = setup
    with pytest.raises(SystemExit) as e:
        main(_argv(root, "gpt", tmp_path / "o", "prune-magic", "--experts", "2"))
    assert e.value.code == 2 and "invalid choice: 'prune-magic'" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(_argv(root, "gpt", tmp_path / "mine", "reap", "--experts", "2")) == 1
    err = capsys.readouterr().err
    assert "not written by moekit" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_mc_moe_with_rtn_and_4_bit_attention_equals_python_and_serves_offloaded(setup, tmp_path):
    root, tok = setup
    argv = _argv(root, "gpt", tmp_path / "q", "mc-moe", "--bits", "2.5", "--group", "16", "--quantizer", "rtn",
                 "--attention-bits", "4")
    assert main(argv) == 0
    got = moekit.load(tmp_path / "q")
    want = GPT.load(root / "gpt")
    method = mcmoe(want, _calibration(root, tok), bits=2.5, group=16, quantizer="rtn", attention_bits=4)
    assert method.attention  # every attention projection packed
    ids = torch.randint(0, want.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(got(ids), want(ids), atol=1e-6, rtol=1e-5)
        served, _ = load_offloaded(tmp_path / "q", tmp_path / "store", budget=1.0)
        torch.testing.assert_close(served(ids), want(ids), atol=1e-6, rtol=1e-5)
    assert main(_argv(root, "gpt", tmp_path / "r", "reap", "--experts", "3", "--attention-bits", "4")) == 1
