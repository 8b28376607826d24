"""Checkpoints survive a kill or an error at every stage of their write, and resume is exact after;
corrupt checkpoints are skipped with a warning, never loaded; pruning never removes the only copy."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from moekit.io import MoekitWarning, fault_hook
from moekit.train.checkpoint import find_checkpoint, list_checkpoints, save_checkpoint
from tests.faults import flip_byte, resign, truncate
from tests.trainrun import trainer

ROOT = Path(__file__).resolve().parents[2]

# Where a checkpoint write can be interrupted, and which occurrence of the stage is the write of the
# step-4 checkpoint (the run folder's own creation passes "manifest" and "publish" once first);
# "exchanged" happens once: when the last step, already saved, is saved again at the end.
STAGES = {"file:model.safetensors": 2, "file:optimizer.safetensors": 2, "file:rng.safetensors": 2,
          "file:state.json": 2, "manifest": 3, "publish": 3, "exchanged": 1, "latest": 2, "prune": 2}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    t = trainer(tmp_path_factory.mktemp("full") / "run")
    t.train()
    return [r["loss"] for r in t.history if "loss" in r], {k: v.clone() for k, v in t.model.state_dict().items()}


def _assert_exact(t, uninterrupted):
    losses, state = uninterrupted
    assert [r["loss"] for r in t.history if "loss" in r] == losses  # bit for bit
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    ckpts = t.ckpt_dir
    assert [s for s, _, _ in list_checkpoints(ckpts)] == [4, 6]
    assert not [p.name for p in ckpts.iterdir() if ".moekit-" in p.name]  # no temporary left behind
    lines = (t.out_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in line] == list(range(1, 7))


# the two-rename path (systems without renameat2) differs from the atomic swap only around the swap
@pytest.mark.parametrize("stage,exchange", [(s, True) for s in STAGES] + [("publish", False), ("exchanged", False)])
def test_a_kill_at_any_stage_of_a_checkpoint_write_resumes_exactly(tmp_path, stage, exchange, uninterrupted):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "tests.trainrun", str(out), stage, str(STAGES[stage]),
                        *([] if exchange else ["no-exchange"])], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]  # killed where asked
    t = trainer(out)
    t.train(resume=True)
    _assert_exact(t, uninterrupted)


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_error_at_any_stage_of_a_checkpoint_write_resumes_exactly(tmp_path, stage, uninterrupted):
    seen = []

    def fail(s):
        if s == stage:
            seen.append(s)
            if len(seen) == STAGES[stage]:
                raise OSError(f"no space left on device ({s})")

    t = trainer(tmp_path / "run")
    with fault_hook(fail), pytest.raises(OSError, match="no space left"):
        t.train()
    assert not [p.name for p in t.ckpt_dir.iterdir() if ".moekit-" in p.name]  # cleaned up at once
    t = trainer(tmp_path / "run")
    t.train(resume=True)
    _assert_exact(t, uninterrupted)


@pytest.mark.parametrize("damage", ["model", "optimizer", "state", "manifest", "missing", "truncate"])
def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, damage, uninterrupted):
    t = trainer(tmp_path / "run")
    t.train()
    newest = t.ckpt_dir / "step-0000006"
    if damage == "model":
        flip_byte(newest / "model.safetensors")
    elif damage == "optimizer":  # an Adam moment: loads fine, changes everything after
        flip_byte(newest / "optimizer.safetensors", -3)
    elif damage == "state":
        (newest / "state.json").write_text('{"step": 4, "history": [')
    elif damage == "manifest":
        (newest / "moekit.json").write_text("{")
    elif damage == "missing":
        (newest / "rng.safetensors").unlink()
    else:
        truncate(newest / "model.safetensors")
    t = trainer(tmp_path / "run")  # steps 5 and 6 again, from step 4
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t.train(resume=True)
    said = [str(w.message) for w in seen if w.category is MoekitWarning]
    assert len(said) == 1, said
    assert re.search(r"skipped a checkpoint that does not verify \(.*step-0000006.*\); moved it to "
                     r"step-0000006.damaged-", said[0]), said
    assert t.history[-1]["step"] == 6 and sum("loss" in r and r["step"] == 5 for r in t.history) == 1
    _assert_exact(t, uninterrupted)
    assert len(list(t.ckpt_dir.glob("step-0000006.damaged-*"))) == 1  # set aside, never deleted


def test_latest_is_only_a_hint(tmp_path, uninterrupted):
    t = trainer(tmp_path / "run")
    t.train()
    flip_byte(t.ckpt_dir / "step-0000006" / "optimizer.safetensors")
    (t.ckpt_dir / "latest").write_text("../../../../etc")  # points outside: never followed
    t = trainer(tmp_path / "run")
    with pytest.warns(MoekitWarning, match="step-0000006.*moved it to step-0000006.damaged-"):
        t.train(resume=True)
    _assert_exact(t, uninterrupted)


def test_saving_a_step_twice_keeps_a_copy_and_only_finite_weights_are_saved(tmp_path):
    t = trainer(tmp_path / "run", steps=2)
    t.train()  # step 2 saved twice: periodic, then final
    ckpt = t.ckpt_dir / "step-0000002"
    first = (ckpt / "state.json").read_text()
    t.history.append({"step": 2, "note": "second save"})
    t.save()
    assert (ckpt / "state.json").read_text() != first and "second save" in (ckpt / "state.json").read_text()
    assert [s for s, _, _ in list_checkpoints(t.ckpt_dir)] == [2]
    with torch.no_grad():
        next(t.model.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf weights at step 2; not checkpointed"):
        t.save()
    assert find_checkpoint(t.ckpt_dir)[0] == ckpt  # the finite one is still there


def test_a_checkpoint_folder_moekit_did_not_write_is_refused(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "thesis.tex").write_text("years of work")
    m = torch.nn.Linear(2, 2)
    with pytest.raises(FileExistsError, match="not a moekit checkpoints"):
        save_checkpoint(tmp_path / "ck", 1, m, torch.optim.AdamW(m.parameters()), {})
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["thesis.tex"]


def test_a_hand_edited_but_re_signed_checkpoint_still_loads_what_it_says(tmp_path):
    """Re-signing is the honest way to edit a checkpoint: the checksums then describe the edit."""
    t = trainer(tmp_path / "run", steps=2)
    t.train()
    ckpt = t.ckpt_dir / "step-0000002"
    state = json.loads((ckpt / "state.json").read_text())
    state["history"].append({"step": 2, "edited": True})
    (ckpt / "state.json").write_text(json.dumps(state))
    assert find_checkpoint(t.ckpt_dir)[0] is None
    resign(ckpt)
    t = trainer(tmp_path / "run", steps=2)
    t.start(resume=True)
    assert t.history[-1] == {"step": 2, "edited": True}


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    from moekit.train.checkpoint import prune_checkpoints

    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())
    for step in (2, 8, 4):  # a newer checkpoint of the run (8) exists when step 4 is written
        save_checkpoint(tmp_path, step, m, opt, {}, keep=3, run="r")
    prune_checkpoints(tmp_path, 4, keep=1, run="r")
    assert [s for s, _, _ in list_checkpoints(tmp_path)] == [4, 8]
    save_checkpoint(tmp_path, 2, m, opt, {}, keep=3, run="r")
    prune_checkpoints(tmp_path, 4, keep=2, run="r")  # step 4 and the newest one before it; the newer 8 stays
    assert [s for s, _, _ in list_checkpoints(tmp_path)] == [2, 4, 8]


def test_a_checkpoint_of_another_run_is_never_resumed(tmp_path, uninterrupted):
    import shutil

    other = trainer(tmp_path / "other", steps=8)
    other.train()  # a different run that got further
    t = trainer(tmp_path / "run")
    t.train()
    shutil.copytree(other.ckpt_dir / "step-0000008", t.ckpt_dir / "step-0000008")
    shutil.copytree(other.ckpt_dir / "step-0000006", t.ckpt_dir / "step-0000005")  # one more, older than ours
    t = trainer(tmp_path / "run")
    t.start(resume=True)
    assert t.step == 6  # its own newest, not the other run's step 8
    t.save()  # and pruning removes the other run's, keeping this run's newest two
    assert [(s, r == t.run) for s, _, r in list_checkpoints(t.ckpt_dir)] == [(4, True), (6, True)]


def test_a_damaged_checkpoint_of_the_step_being_saved_is_set_aside(tmp_path):
    t = trainer(tmp_path / "run", steps=2)
    t.train()
    (t.ckpt_dir / "step-0000002" / "moekit.json").write_text("{")  # its manifest unreadable: not provably ours
    with pytest.warns(MoekitWarning, match=r"a damaged checkpoint of the same step was moved to step-0000002.damaged-"):
        t.save()
    assert find_checkpoint(t.ckpt_dir)[0] == t.ckpt_dir / "step-0000002"
    assert len(list(t.ckpt_dir.glob("step-0000002.damaged-*"))) == 1


def _as_shard(m, r, W):
    """``m`` made, in place, what expert-parallel rank ``r`` of ``W`` holds (its slice of every
    expert tensor, marked as moekit.parallel.expert_parallel marks it), without a process group."""
    for name, p in list(m.named_parameters()):
        if ".experts." in name:
            owner, _, attr = name.rpartition(".")
            E = p.shape[0]
            q = torch.nn.Parameter(p.detach()[r * E // W:(r + 1) * E // W].clone())
            q.moekit_ep = (r, W, E)
            setattr(m.get_submodule(owner), attr, q)
    return m


def _adamw(model):
    return torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                              {"params": [p for p in model.parameters() if p.dim() < 2]}])


def test_expert_shards_join_and_split_between_layouts(tmp_path):
    from moekit.train import load_checkpoint

    t = trainer(tmp_path / "run", steps=2)
    t.train()  # one process: whole expert tensors, with AdamW moments
    whole = t.ckpt_dir / "step-0000002"
    moments = {n: t.optimizer.state[p] for n, p in t.model.named_parameters()}
    for r in range(2):  # loaded at 2 expert shards: each its slice of weights and moments
        m = _as_shard(trainer(None).model, r, 2)
        with torch.no_grad():
            for p in m.parameters():
                p.zero_()
        opt = _adamw(m)
        load_checkpoint(whole, m, opt)
        for n, p in m.named_parameters():
            want, avg = dict(t.model.named_parameters())[n], moments[n]["exp_avg"]
            if ".experts." in n:
                want, avg = want[r * 2:(r + 1) * 2], avg[r * 2:(r + 1) * 2]
            assert torch.equal(p, want) and torch.equal(opt.state[p]["exp_avg"], avg), n
        save_checkpoint(tmp_path / f"rank{r}-of-2", 2, m, opt, {"history": []}, run="r")
    parts = [tmp_path / f"rank{r}-of-2" / "step-0000002" for r in range(2)]
    back = trainer(None)  # and the shards, joined, load in one process again
    load_checkpoint(parts, back.model, back.optimizer)
    for n, p in back.model.named_parameters():
        assert torch.equal(p, dict(t.model.named_parameters())[n]), n
        assert torch.equal(back.optimizer.state[p]["exp_avg_sq"], moments[n]["exp_avg_sq"]), n
    with pytest.raises(ValueError, match=r"are not the 2 shards of one checkpoint in order \(they say \[\[1, 2\], "
                                         r"\[0, 2\]\]\)"):
        load_checkpoint(parts[::-1], back.model, back.optimizer)
    from moekit.models import GPT, GPTConfig
    from tests.trainrun import VOCAB

    other = GPT(GPTConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, d_ff=32).with_moe(4, 2))
    with pytest.raises(ValueError, match=r"step-0000002: the checkpoint does not fit the model \(missing \['blocks.1"):
        load_checkpoint(whole, other, _adamw(other))


def test_load_checkpoint_verifies_what_it_loads(tmp_path):
    from moekit.io import IntegrityError
    from moekit.train import load_checkpoint

    t = trainer(tmp_path / "run", steps=2)
    t.train()
    ckpt = t.ckpt_dir / "step-0000002"
    flip_byte(ckpt / "optimizer.safetensors", -3)  # an Adam moment: it would load, and change every step after
    with pytest.raises(IntegrityError, match=r"optimizer.safetensors: checksum mismatch"):
        load_checkpoint(ckpt, t.model, t.optimizer)
