import json

import pytest
import torch

from moekit.data import TokenStream, train_tokenizer
from moekit.data.corpus import Document
from moekit.models import GPT, GPTConfig
from moekit.train import TrainConfig, Trainer

TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "Le renard brun saute par-dessus le chien. " * 8)


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    tok, _ = train_tokenizer([TEXT], 300, cache_dir=tmp_path_factory.mktemp("tok"))
    docs = [Document(TEXT, f"d{i}", "en", "t") for i in range(6)]
    return TokenStream.from_documents(docs[:5], tok), TokenStream.from_documents(docs[5:], tok), tok.get_vocab_size()


def _model(vocab, moe=True):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, d_ff=64)
    return GPT(cfg.with_moe(4, 2) if moe else cfg)


def _cfg(**kw):
    return TrainConfig(**{"steps": 8, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2,
                          "log_every": 1, "eval_chunks": 4, **kw})


def test_loss_decreases(streams):
    train, val, vocab = streams
    trainer = Trainer(_model(vocab), train, val, _cfg(steps=40, lr=1e-2), progress=False)
    history = trainer.train()
    losses = [r["loss"] for r in history if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert history[-1]["val_ppl"] < 300


def test_resume_equals_uninterrupted_run(streams, tmp_path):
    train, val, vocab = streams
    full = Trainer(_model(vocab), train, None, _cfg(), out_dir=tmp_path / "full", progress=False)
    full.train()
    want = [r["loss"] for r in full.history if "loss" in r]

    # a run killed after step 5: its last checkpoint is step 4, and it logged step 5 after it
    killed = Trainer(_model(vocab), train, None, _cfg(ckpt_every=4), out_dir=tmp_path / "run", progress=False)
    killed.start()
    for _ in range(5):
        rec = killed.train_step()
        killed._log(rec)
        if killed.step % 4 == 0:
            killed.save()
    del killed

    resumed = Trainer(_model(vocab), train, None, _cfg(ckpt_every=4), out_dir=tmp_path / "run", progress=False)
    resumed.train(resume=True)
    got = [r["loss"] for r in resumed.history if "loss" in r]
    assert got == want  # bit for bit, steps 5..8 included
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 9))
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-0000008\n"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no half-written checkpoint left


def test_resume_without_a_run_or_checkpoint_is_an_error(streams, tmp_path):
    train, _, vocab = streams
    with pytest.raises(ValueError, match="no moekit.json, so not a complete moekit train-run"):
        Trainer(_model(vocab), train, None, _cfg(), out_dir=tmp_path, progress=False).train(resume=True)
    Trainer(_model(vocab), train, None, _cfg(), out_dir=tmp_path / "r", progress=False).start()  # no step yet
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        Trainer(_model(vocab), train, None, _cfg(), out_dir=tmp_path / "r", progress=False).train(resume=True)


def test_aux_losses_are_added(streams):
    train, _, vocab = streams
    trainer = Trainer(_model(vocab), train, None, _cfg(steps=1), progress=False)
    rec = trainer.train_step()
    assert rec["aux"] > 0


def test_budget_and_config_errors(streams):
    train, _, vocab = streams
    with pytest.raises(ValueError, match="too small to train one step"):
        Trainer(_model(vocab), train, None, _cfg(minutes=1e-9), progress=False).train()
    with pytest.raises(ValueError, match="minutes must be > 0"):
        _cfg(minutes=0)
    with pytest.raises(ValueError, match=r"steps must lie in \[1, inf\], got 0"):
        _cfg(steps=0)
    with pytest.raises(ValueError, match="too small for seq_len=4096"):
        Trainer(_model(vocab), train, None, _cfg(seq_len=4096), progress=False)


def test_wall_clock_budget_stops_the_run(streams):
    train, _, vocab = streams
    trainer = Trainer(_model(vocab), train, None, _cfg(steps=100_000, minutes=0.02), progress=False)
    history = trainer.train()
    stop = next(r for r in history if r.get("stopped") == "wall-clock budget")
    # it stops on the first step past the budget (log_every=1: every step records its elapsed time)
    elapsed = {r["step"]: r["elapsed_s"] for r in history if "elapsed_s" in r and "stopped" not in r}
    assert stop["step"] == trainer.step > 1 and stop["elapsed_s"] == elapsed[stop["step"]]
    assert elapsed[stop["step"] - 1] <= 1.2 < stop["elapsed_s"]
