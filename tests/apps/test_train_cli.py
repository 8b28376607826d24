"""`moekit train`: --device, and torchrun without --expert-parallel (data parallel) against one process."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from moekit.apps.cli.main import main
from moekit.loader import generate, load, load_tokenizer
from moekit.models import GPT


def _train(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--steps", "4", "--ckpt-every", "2", "--eval-every", "2",
            "--vocab", "300", "--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--seq-len", "16",
            "--batch-size", "4", "--warmup", "1", "--no-progress", *extra]


def _losses(out):
    """The training and validation losses the run logged."""
    return [r.get("loss", r.get("val_loss")) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r or "val_loss" in r]


def test_the_device_flag_is_documented_and_a_resume_may_change_it(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--device \{auto,cpu,cuda\} where to train: cuda .* cpu, or auto: cuda if there is a GPU "
                     r"\(default: auto\)", text), text
    run = tmp_path / "run"
    assert main(_train(corpus, run)) == 0
    assert json.loads((run / "moekit.json").read_text())["config"]["device"] == "auto"
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--device", "cpu", "--no-progress"]) == 0
    assert "resume: continuing from step 4 with device 'auto' -> 'cpu', steps 4 -> 6" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error where there is no GPU")
def test_cuda_where_there_is_none_is_one_line_and_writes_nothing(tmp_path, corpus, capsys):
    assert main(_train(corpus, tmp_path / "run", "--device", "cuda")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"moekit train: error: device 'cuda': CUDA is not available here .* use the "
                                      r"device 'cpu' or 'auto'$", err[0]), err
    assert not (tmp_path / "run").exists()


def test_torchrun_without_expert_parallel_trains_data_parallel(tmp_path, corpus):
    """Two processes, each half of every batch, gradients averaged by DDP: the run of one process."""
    assert main(_train(corpus, tmp_path / "one")) == 0
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "moekit", *_train(corpus, out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_losses(out)) == 3 and _losses(out) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    one, two = GPT.load(tmp_path / "one" / "model").state_dict(), GPT.load(out / "model").state_dict()
    for k, v in one.items():
        assert torch.allclose(two[k], v, rtol=0, atol=1e-5), k
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "moekit.json", "step-0000002",
                                                                      "step-0000004"]
    assert res.stdout.count("validation perplexity") == 1 and "Warning" not in res.stderr, res.stderr[-3000:]


# ----------------------------------------------------------------------------------- --config


def _toml(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_a_config_file_sets_every_kind_of_setting_and_flags_override_it(tmp_path, corpus):
    cfg = _toml(tmp_path, f'data = "{corpus}"\n[model]\nffn = "moe"\nexperts = 4\nk = 1\nvocab = 300\nd_model = 32\n'
                          'layers = 1\nheads = 2\nd_ff = 64\nrope_theta = 500.0\ntie_embeddings = false\n'
                          'router_args = { k = 1, balance = 0.05 }\n'
                          '[train]\nsteps = 3\nseq_len = 16\nbatch_size = 2\nwarmup_steps = 1\nweight_decay = 0.0\n'
                          'beta2 = 0.99\neval_every = 0\nckpt_every = 0\neval_chunks = 2\ndevice = "cpu"\n')
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--steps", "2", "--no-progress"]) == 0
    man = json.loads((run / "moekit.json").read_text())
    assert man["config"]["steps"] == 2  # the flag wins over the file's 3
    assert {k: man["config"][k] for k in ("weight_decay", "beta2", "eval_chunks", "warmup_steps", "device")} == {
        "weight_decay": 0.0, "beta2": 0.99, "eval_chunks": 2, "warmup_steps": 1, "device": "cpu"}
    model = GPT.load(run / "model")
    c = model.config
    assert (c.rope_theta, c.tie_embeddings, c.ffn[0]["num_experts"]) == (500.0, False, 4)
    assert c.ffn[0]["router_args"] == {"k": 1, "balance": 0.05} and model.blocks[0].ffn.gate.balance == 0.05
    # the resolved settings, passed back, start the same run
    again = tmp_path / "again"
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(again), "--no-progress"]) == 0
    m2 = json.loads((again / "moekit.json").read_text())
    assert m2["config"] == man["config"] and m2["settings"]["flags"] == man["settings"]["flags"]
    for name, t in GPT.load(again / "model").state_dict().items():
        torch.testing.assert_close(t, model.state_dict()[name], rtol=0, atol=0)
    # and a resume may take it too: nothing conflicts
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(run), "--resume", "--steps", "3",
                 "--no-progress"]) == 0


@pytest.mark.parametrize("text, msg", [
    ("[model]\nexperts = 0\n", r"--config .*: experts = 0: must lie in \[1, inf\]"),
    ('[model]\nffn = "sparse"\n', r"ffn = 'sparse': not one of \['dense', 'moe', 'mole'\]"),
    ("[train]\nbeta1 = 2.0\n", r"TrainConfig: beta1 must lie in \[0, 1\]"),
    ("[model]\nk = 1\n", r"--k do not apply to --ffn dense"),
    ("[train]\nwarmup = 3\n", r"\[train\]: unknown key\(s\) \['warmup'\]"),
])
def test_a_bad_config_file_is_one_line(tmp_path, corpus, capsys, text, msg):
    cfg = _toml(tmp_path, text)
    assert main(["train", "--config", str(cfg), "--data", str(corpus), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(msg, err[0]), err
    assert not (tmp_path / "run").exists()


def test_a_resume_with_a_conflicting_config_is_refused(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_train(corpus, run)) == 0
    cfg = _toml(tmp_path, "[model]\nd_model = 64\n[train]\nsteps = 6\n")
    assert main(["train", "--config", str(cfg), "--out", str(run), "--resume", "--no-progress"]) == 1
    assert "--d-model 64 (the run has 32)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- --ffn mole


def test_train_mole_writes_its_table_and_generate_serves_it(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(_train(corpus, run, "--ffn", "mole", "--experts", "2", "--table-dtype", "float32")) == 0
    assert "MoLE lookup table (float32) written to" in capsys.readouterr().out
    model = GPT.load(run / "model").eval()
    assert model.config.ffn[0] == {"kind": "mole", "num_experts": 2, "d_ff": 64}
    assert main(["generate", "--model", str(run / "model"), "--prompt", "the cat", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert f"experts read from the table {run / 'mole_table'}" in out.err
    tok = load_tokenizer(run / "model")
    ids = torch.tensor([tok.encode("the cat")])
    want = generate(model, ids, 5, eos_token_id=tok.eos)  # the train form computes its experts
    assert out.out.rstrip("\n") == "the cat" + tok.decode(want[0, ids.shape[1]:].tolist())
    assert torch.equal(generate(load(run / "model"), ids, 5, eos_token_id=tok.eos), want)
    assert main(_train(corpus, tmp_path / "x", "--table-dtype", "int8")) == 1
    assert "--table-dtype do not apply to --ffn dense" in capsys.readouterr().err
