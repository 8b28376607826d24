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


# ----------------------------------------------------------------------------------- divergence, resume, overwrite

def _strict(line):
    def refuse(c):
        raise ValueError(f"not JSON: {c}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -1.0, 0.0])
def test_learning_rate_must_be_finite_and_positive(lr):
    with pytest.raises(ValueError, match=r"TrainConfig: lr must (be finite|lie in \(0, inf\])"):
        _cfg(lr=lr)


def _nan_from(t, steps):
    """Make the model's loss NaN at the given (1-based) steps."""
    loss = t.model.loss

    def patched(x, y):
        out = loss(x, y)
        return out * float("nan") if t.step + 1 in steps else out

    t.model.loss = patched


def test_a_nonfinite_step_is_skipped_and_never_applied(tmp_path):
    from tests.trainrun import trainer

    t = trainer(tmp_path / "a", steps=4)
    _nan_from(t, {2})
    t.start()
    t.train_step()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()}
    rec = t.train_step()
    assert rec["skipped"] is True and rec["nonfinite"] == ["loss", "grad_norm"] and t.step == 2
    assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())
    assert all(torch.equal(v, moments[k]) for k, v in t.optimizer.state_dict()["state"][0].items())

    t = trainer(tmp_path / "b", steps=4)
    _nan_from(t, {2})
    t.train()  # one skipped step is below the limit: the run goes on to the end
    assert t.step == 4 and int(t.optimizer.state_dict()["state"][0]["step"]) == 3  # three updates applied
    lines = [_strict(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in lines if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["step"] == 2 and skipped[0]["loss"] is None
    assert skipped[0]["nonfinite"] == ["loss", "grad_norm"] and skipped[0]["grad_norm"] is None
    assert [r for r in t.history if r.get("skipped")] == skipped  # in memory as on disk (what a resume reads back)


def test_divergence_stops_the_run_and_names_the_last_finite_checkpoint(tmp_path):
    from moekit.train.trainer import TrainingDiverged
    from tests.trainrun import trainer

    t = trainer(tmp_path / "run", steps=8, max_nonfinite=3)
    _nan_from(t, set(range(3, 9)))
    with pytest.raises(TrainingDiverged, match=r"steps 3-5 had a NaN or inf loss or gradient \(3 in a row, the limit "
                                                r"max_nonfinite=3\); none was applied; the last finite checkpoint is "
                                                r".*step-0000002 \(step 2\)"):
        t.train()
    ckpts = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert ckpts == ["step-0000002"]  # the periodic save at step 4 fell on a skipped step: not written
    records = [_strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 5, "stopped": "diverged"}
    assert [r["step"] for r in records if r.get("skipped")] == [3, 4, 5]
    t2 = trainer(tmp_path / "run", steps=8)  # the run resumes from its finite checkpoint
    t2.train(resume=True)
    assert t2.step == 8 and all(torch.isfinite(p).all() for p in t2.model.parameters())


def test_weights_made_nonfinite_by_an_update_stop_the_run_at_once(tmp_path):
    from moekit.train.trainer import TrainingDiverged
    from tests.trainrun import trainer

    t = trainer(tmp_path / "run", steps=6)
    step = t.optimizer.step

    def overflowing_step():  # an update that overflows (torch's AdamW refuses absurd learning rates itself)
        step()
        if t.step == 2:
            with torch.no_grad():
                next(t.model.parameters()).mul_(float("inf"))

    t.optimizer.step = overflowing_step
    with pytest.raises(TrainingDiverged, match=r"the update of step 3 made weights NaN or inf \(learning rate "
                                                r".*\); the last finite checkpoint is .*step-0000002"):
        t.train()
    assert [p.name for p in t.ckpt_dir.iterdir() if p.name.startswith("step-")] == ["step-0000002"]


def test_resume_refuses_other_settings_and_reports_the_ones_it_applies(tmp_path):
    from moekit.io import MoekitWarning
    from tests.trainrun import trainer

    trainer(tmp_path / "run", steps=4).train()
    with pytest.raises(ValueError, match=r"resume: .*run was started with other settings \(batch_size: run 2, now 4; "
                                         r"seed: run 0, now 1\)"):
        trainer(tmp_path / "run", steps=4, batch_size=4, seed=1).train(resume=True)
    t = trainer(tmp_path / "run", steps=4)
    t.settings = {"model": "another"}
    with pytest.raises(ValueError, match=r"settings.model: run None, now 'another'"):
        t.train(resume=True)
    with pytest.raises(ValueError, match="steps=3 but the run is already at step 4"):
        trainer(tmp_path / "run", steps=3).train(resume=True)
    t = trainer(tmp_path / "run", steps=6, lr=1e-3)
    with pytest.warns(MoekitWarning, match=r"continuing from step 4 with lr 0.003 -> 0.001, steps 4 -> 6"):
        t.train(resume=True)
    assert t.step == 6
    assert json.loads((tmp_path / "run" / "moekit.json").read_text())["config"]["steps"] == 6


def test_a_run_folder_is_overwritten_only_when_asked(tmp_path):
    from moekit.train.checkpoint import list_checkpoints
    from tests.trainrun import trainer

    first = trainer(tmp_path / "run", steps=4)
    first.train()
    first.model.save(tmp_path / "run" / "model")
    from moekit.offload import write_store

    write_store(first.model, tmp_path / "run" / "model" / "experts")  # what moekit generate --offload leaves there
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds a moekit training run \(checkpoints up to step 4\); continue it "
                                              r"with --resume .* or start a new one in its place with --overwrite"):
        trainer(tmp_path / "run", steps=4).train()
    assert [s for s, _, _ in list_checkpoints(first.ckpt_dir)] == [2, 4]
    second = trainer(tmp_path / "run", steps=2, ckpt_every=0)
    second.overwrite = True
    second.start()  # the previous run's own files are gone before the new run writes anything
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "moekit.json", "notes.txt"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""
    second.train()
    second.model.save(tmp_path / "run" / "model")  # as moekit train does at the end
    assert [(s, r) for s, _, r in list_checkpoints(first.ckpt_dir)] == [(2, second.run)]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="not written by moekit"):
        trainer(tmp_path / "elsewhere").train()


def test_overwriting_an_expert_parallel_run_removes_every_rank_s_checkpoints(tmp_path):
    from tests.trainrun import trainer

    trainer(tmp_path / "run", steps=2).train()
    ckpts = tmp_path / "run" / "checkpoints"  # the layout of an expert-parallel run: one folder per rank
    (tmp_path / "rank0-of-2").mkdir()
    ckpts.rename(tmp_path / "rank0-of-2" / "x")
    ckpts.mkdir()
    (tmp_path / "rank0-of-2" / "x").rename(ckpts / "rank0-of-2")
    t = trainer(tmp_path / "run", steps=2)
    t.overwrite = True
    t.train()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "moekit.json", "step-0000002"]


# ----------------------------------------------------------------------------------- devices

def _losses(t):
    return [r["loss"] for r in t.history if "loss" in r]


def test_the_device_is_checked_and_a_resume_may_change_it(tmp_path):
    from moekit.io import MoekitWarning
    from tests.trainrun import trainer

    assert TrainConfig(device=torch.device("cpu")).device == "cpu" and TrainConfig().device == "cpu"
    with pytest.raises(ValueError, match="TrainConfig: device must be one of auto, cpu, cuda or cuda:N, got 'gpu'"):
        TrainConfig(device="gpu")
    first = trainer(tmp_path / "run", steps=4)
    first.train()
    t = trainer(tmp_path / "run", steps=4, device="auto")
    with pytest.warns(MoekitWarning, match="continuing from step 4 with device 'cpu' -> 'auto'"):
        t.train(resume=True)
    assert json.loads((tmp_path / "run" / "moekit.json").read_text())["config"]["device"] == "auto"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
def test_training_on_cuda_follows_the_cpu():
    from tests.trainrun import trainer

    cpu, gpu = trainer(None), trainer(None, device="cuda")
    cpu.train()
    gpu.train()
    assert all(p.is_cuda for p in gpu.model.parameters())
    assert _losses(gpu) == pytest.approx(_losses(cpu), rel=1e-4)
    for k, v in cpu.model.state_dict().items():
        assert torch.allclose(gpu.model.state_dict()[k].cpu(), v, rtol=0, atol=1e-4), k


@pytest.mark.cuda
@needs_cuda
def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu(tmp_path):
    from moekit.io import MoekitWarning
    from tests.trainrun import trainer

    full = trainer(tmp_path / "full", device="cuda")
    full.train()
    killed = trainer(tmp_path / "run", device="cuda")
    killed.start()
    for _ in range(4):  # stopped after step 4 (checkpoints at 2 and 4)
        killed._log(killed.train_step())
        if killed.step % 2 == 0:
            killed.save()
    at4 = {k: v.cpu() for k, v in killed.model.state_dict().items()}
    resumed = trainer(tmp_path / "run", device="cpu")
    with pytest.warns(MoekitWarning, match="continuing from step 4 with device 'cuda' -> 'cpu'"):
        resumed.start(resume=True)
    assert all(torch.equal(v, at4[k]) for k, v in resumed.model.state_dict().items())  # the very weights
    resumed.train()
    assert all(not p.is_cuda for p in resumed.model.parameters())
    assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-4)
    for k, v in full.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[k], v.cpu(), rtol=0, atol=1e-4), k
