"""The command line at its edges: every user error is one or two lines naming the argument or file
and the fix, with a non-zero exit and no traceback; names are checked before slow work; nothing the
user wrote is overwritten or deleted; --resume is honest; a diverging run fails."""

import hashlib
import json
import re

import pytest
import torch

from moekit.apps.cli.main import main
from moekit.models import GPT, GPTConfig
from tests.faults import flip_byte, resign


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 2 and "Traceback" not in err, err
    return err


def _error(argv, capsys) -> str:
    """Run the CLI expecting a user error: exit status 1, one line on stderr, no traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "warning:" not in line]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("moekit "), err
    return lines[0]


@pytest.mark.parametrize("argv,match", [
    (["train", "--out", "x", "--ckpt-every", "-1"], r"argument --ckpt-every: must lie in \[0, inf\], got -1"),
    (["train", "--out", "x", "--warmup", "-3"], r"argument --warmup: must lie in \[0, inf\], got -3"),
    (["train", "--out", "x", "--expert-parallel", "0"], r"argument --expert-parallel: must lie in \[1, inf\], got 0"),
    (["train", "--out", "x", "--lr", "inf"], r"argument --lr: must be finite, got inf"),
    (["train", "--out", "x", "--lr", "nan"], r"argument --lr: must be finite, got nan"),
    (["train", "--out", "x", "--steps", "1.5"], r"argument --steps: expected an integer, got '1.5'"),
    (["train", "--out", "x", "--vocab", "100"], r"argument --vocab: must lie in \[258, inf\], got 100"),
    (["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "-1"], r"argument --max-new-tokens: must lie"),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "nan"], r"argument --temperature: must be finite"),
    (["convert", "--method", "prune", "--model", "m", "--out", "o", "--seq-len", "0"], r"argument --seq-len: must lie"),
    (["convert", "--method", "prune", "--model", "m", "--out", "o", "--tune-steps", "-1"], r"argument --tune-steps"),
    (["convert", "--method", "prune", "--model", "m", "--out", "o", "--keep", "1.5"], r"argument --keep: must lie in"),
    (["experiment", "dselect", "--seeds", "0"], r"argument --seeds: must lie in \[1, inf\], got 0"),
    (["bench", "layer", "--repeats", "0"], r"argument --repeats: must lie in \[1, inf\], got 0"),
    (["bench", "parallel", "--world", "0"], r"argument --world: must lie in \[2, inf\], got 0"),
    (["demo", "--minutes", "-1"], r"argument --minutes: must lie in \(0, inf\], got -1.0"),
])
def test_every_numeric_flag_has_a_checked_range(argv, match, capsys):
    err = _usage_error(argv, capsys)
    assert re.search(match, err), err
    assert err.splitlines()[1].startswith("(see moekit ")


def test_names_are_checked_before_any_slow_work(tmp_path, monkeypatch, capsys):
    def slow(*a, **k):
        raise AssertionError("slow work started before the names were checked")

    monkeypatch.setattr("moekit.apps.cli.train.load_corpus", slow)
    monkeypatch.setattr("moekit.apps.demo.run.prepare_corpus", slow)
    monkeypatch.setattr("moekit.apps.cli.convert._load_model", slow)
    line = _error(["train", "--out", str(tmp_path / "r"), "--ffn", "moe", "--router", "top2"], capsys)
    assert "--router 'top2': unknown; valid names are [" in line
    line = _error(["train", "--out", str(tmp_path / "r"), "--ffn", "moe", "--experts", "4", "--k", "5"], capsys)
    assert "--k 5 must be <= --experts 4" in line
    line = _error(["train", "--out", str(tmp_path / "r"), "--d-model", "30", "--heads", "4"], capsys)
    assert "d_model=30 must split into n_heads=4" in line
    line = _error(["demo", "--out", str(tmp_path / "d"), "--variants", "dense", "moe-top3"], capsys)
    assert "unknown variants ['moe-top3']" in line
    line = _error(["convert", "--method", "partition", "--router", "nope", "--model", "m", "--out", "o"], capsys)
    assert "--router 'nope': unknown" in line
    assert not any(tmp_path.iterdir())  # nothing written


def test_bench_offload_with_a_missing_model_does_not_train_into_it(tmp_path, capsys):
    line = _error(["bench", "offload", "--model", str(tmp_path / "typo"), "--out", str(tmp_path / "o.json")], capsys)
    assert "--model " in line and "typo: no such folder" in line
    assert not any(tmp_path.iterdir())


def test_reports_never_replace_a_users_file(tmp_path, capsys):
    mine = tmp_path / "results.json"
    mine.write_text('{"my": "results"}')
    line = _error(["bench", "layer", "--quick", "--out", str(mine)], capsys)
    assert "exists and is not a moekit layer report; choose another path" in line
    assert mine.read_text() == '{"my": "results"}'


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"]
    assert "no such folder" in _error(argv, capsys)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main([*argv, "--debug"])
    monkeypatch.setenv("MOEKIT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


# ----------------------------------------------------------------------------------- runs and stores


def _train(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--steps", "4", "--ckpt-every", "2", "--eval-every", "0",
            "--vocab", "300", "--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--seq-len", "16",
            "--batch-size", "2", "--warmup", "1", "--no-progress", *extra]


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_a_store_path_that_is_not_a_store_is_never_replaced(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_train(corpus, run, "--ffn", "moe", "--experts", "4")) == 0
    capsys.readouterr()
    sibling = tmp_path / "run.tmp"  # what the store writer used to delete
    sibling.mkdir()
    (sibling / "keep.txt").write_text("mine")
    before, before_sibling = _snapshot(run), _snapshot(sibling)
    line = _error(["generate", "--model", str(run / "model"), "--prompt", "the cat", "--max-new-tokens", "2",
                   "--offload", "--store", str(run)], capsys)
    assert f"expert store {run}: exists and holds a moekit train-run, not a moekit expert-store" in line
    assert _snapshot(run) == before and _snapshot(sibling) == before_sibling
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "run", "run.tmp"]
    store = tmp_path / "store"  # a new folder is fine, and then reused
    for _ in range(2):
        assert main(["generate", "--model", str(run / "model"), "--prompt", "the cat", "--max-new-tokens", "2",
                     "--offload", "--store", str(store)]) == 0
    assert (store / "moekit.json").exists()


def test_train_into_an_existing_run_needs_resume_or_overwrite(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_train(corpus, run)) == 0
    before = _snapshot(run)
    line = _error(_train(corpus, run), capsys)
    assert "holds a moekit training run; continue it with --resume or start a new one in its place with --overwrite" \
        in line
    assert _snapshot(run) == before
    assert main(_train(corpus, run, "--overwrite", "--steps", "2")) == 0
    assert "checkpoints/step-0000004" not in _snapshot(run)  # the previous run's files are gone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "draft.txt").write_text("my text")
    line = _error(_train(corpus, mine), capsys)
    assert "not written by moekit" in line and (mine / "draft.txt").read_text() == "my text"
    assert "contradict" in _error(_train(corpus, run, "--resume", "--overwrite"), capsys)


def test_resume_refuses_conflicting_flags_and_reports_applied_ones(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_train(corpus, run, "--ffn", "moe", "--experts", "4")) == 0
    capsys.readouterr()
    line = _error(["train", "--out", str(run), "--resume", "--experts", "8", "--batch-size", "4"], capsys)
    assert re.search(r"--resume: .* was started with other settings: --experts 8 \(the run has 4\); --batch-size 4 "
                     r"\(the run has 2\)\. Drop these flags", line), line
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().replace("cat", "dog"))
    assert "--data " in _error(["train", "--out", str(run), "--resume", "--data", str(other)], capsys)
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "moekit train: warning: resume: continuing from step 4 with steps 4 -> 6" in err
    assert GPT.load(run / "model") is not None
    corpus.write_text(corpus.read_text().replace("mat", "rug"))  # the text itself changed (every paragraph)
    line = _error(["train", "--out", str(run), "--resume", "--steps", "8"], capsys)
    assert "changed since the run started (fingerprint" in line


def test_a_diverging_run_fails_and_its_metrics_stay_json(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    line = _error(_train(corpus, run, "--lr", "1e3", "--steps", "30", "--ckpt-every", "0"), capsys)
    assert line.startswith("moekit train: error: training diverged: ") and "lower learning rate" in line
    for text in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    assert not (run / "model").exists()  # no garbage model written


def test_a_damaged_model_is_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, d_ff=64)).save(tmp_path / "m")
    flip_byte(tmp_path / "m" / "model.safetensors")
    line = _error(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--tokenizer", "none.json"], capsys)
    assert "none.json does not exist" in line
    line = _error(["convert", "--method", "prune", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")], capsys)
    assert "model.safetensors: checksum mismatch" in line and "save or train the model again" in line


# ----------------------------------------------------------------------------------- train: resume and data


def _train_args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--steps", "4", "--ckpt-every", "2", "--eval-every", "2",
            "--vocab", "300", "--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--seq-len", "16",
            "--batch-size", "2", "--warmup", "1", "--no-progress", *extra]


def test_cli_train_resume_and_tokenizer_mismatch(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"paragraph {i}: the cat sat on the mat and looked around." for i in range(300)),
                    encoding="utf-8")
    out = tmp_path / "run"
    assert main(_train_args(data, out, "--ffn", "moe", "--experts", "4")) == 0
    assert (out / "model" / "model.safetensors").exists() and (out / "checkpoints" / "latest").exists()
    assert main(_train_args(data, out, "--resume")) == 0  # already at its last step: nothing lost, no error
    from moekit.data import train_tokenizer

    other, _ = train_tokenizer(["completely different text " * 40], 280, cache_dir=tmp_path / "tok")
    (out / "tokenizer.json").write_text(other.to_str())
    assert main(_train_args(data, out, "--resume")) == 1  # replaced by hand: its checksum no longer matches
    assert "tokenizer.json: " in capsys.readouterr().err
    resign(out)  # and behind the checksum, the vocabulary is checked
    assert main(_train_args(data, out, "--resume")) == 1
    assert re.search("vocab_size=.*resume with the tokenizer the run was started with", capsys.readouterr().err)


def test_cli_train_missing_data(tmp_path, capsys):
    assert main(_train_args(tmp_path / "missing.txt", tmp_path / "run")) == 1
    assert "no such file" in capsys.readouterr().err
