"""`moekit experiment compress` (moekit/apps/experiments/compress.py) end to end in quick mode, with
the bytes checked against hand-counted expert shapes and the base model's cache."""

import json
import math

import pytest
import torch

from moekit.apps.cli.main import main
from moekit.apps.experiments import compress as experiment
from moekit.apps.presets import QUICK, prepare_corpus
from moekit.models import GPT


def _row(summary, label, **where):
    return next(r for r in summary if r["label"] == label and all(r.get(k) == v for k, v in where.items()))


def test_experiment_compress_quick(tmp_path, monkeypatch):
    assert main(["experiment", "compress", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["seeds"] == 1 and result["steps"] == experiment.QUICK_STEPS
    summary, runs = result["summary"], result["runs"]
    assert len(summary) == len(runs)  # one seed: one run per row
    for row, run in zip(summary, runs):
        assert math.isclose(row["val_ppl"], run["val_ppl"]) and row["val_ppl_sd"] == 0
        assert set(row["ppl_by_language"]) == {"en", "fr", "es"} and row["tok_s"] > 0
    # the base row's perplexity, recomputed here from the cached model on the same validation windows
    _, val, _ = prepare_corpus(QUICK)
    x, y, _ = val.chunks(QUICK.seq_len, experiment.scale(True)["eval_chunks"])
    with torch.no_grad():
        logits = GPT.load(tmp_path / "models" / "moe8_s0").eval()(x)
    want = math.exp(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.reshape(-1))))
    assert math.isclose(_row(summary, "base (8 experts)")["val_ppl"], want, rel_tol=1e-4)
    labels = {r["label"] for r in summary}
    assert set(experiment.AT_EQUAL_EXPERTS) <= labels and {"mc-moe pmq (gptq)", "mc-moe uniform (rtn)",
                                                          "trained from scratch", "odp (median per layer)",
                                                          "fixed threshold"} <= labels
    # pruning removes whole experts and their router rows: 2 layers x (3 matrices D x F + a router row D) fp32
    D, F = QUICK.d_model, QUICK.d_ff // 2
    base = _row(summary, "base (8 experts)")["bytes"]
    for n in experiment.E_PRIMES:
        for label in ("prune-random", "prune-count", "reap", "naee", "easy-ep"):
            assert _row(summary, label, experts=n)["bytes"] == base - 2 * (8 - n) * (3 * D * F + D) * 4
        # a model pruned to E' has the shapes of one trained with E' experts
        assert _row(summary, "reap", experts=n)["bytes"] == _row(summary, "trained from scratch", experts=n)["bytes"]
        # merging keeps the 8-row router and adds its int64 expert -> group map
        merged = _row(summary, "hc-smoe (average)", experts=n)["bytes"]
        assert merged == base - 2 * (8 - n) * 3 * D * F * 4 + 2 * 8 * 8
    fp32 = 2 * 8 * 3 * D * F * 4
    for bits in experiment.BITS:  # equal average bits: about equal packed bytes (widths pack differently)
        sizes = [_row(summary, f"mc-moe {a} ({q})", bits=bits)["bytes"] - (base - fp32)
                 for a in experiment.ALLOCATIONS for q in ("rtn", "gptq")]
        assert max(sizes) / min(sizes) < 1.05 and max(sizes) < (bits + 1.5) / 32 * fp32  # scales and zeros: < 1.5 bit
    odp, fixed = _row(summary, "odp (median per layer)"), _row(summary, "fixed threshold")
    assert 0.1 < odp["pruned"] < 0.9 and abs(odp["pruned"] - fixed["pruned"]) < 0.03  # matched pruned fraction
    assert (tmp_path / "compress.png").read_bytes()[:4] == b"\x89PNG"
    assert "| reap |" in experiment.report_markdown(result)

    # a rerun in the same folder takes every row from results.json; a row missing there is measured again
    old = {(r["label"], r.get("experts"), r.get("bits")): r for r in runs}
    result["runs"] = [r for r in runs if r["label"] != "reap"]
    (tmp_path / "results.json").write_text(json.dumps(result))
    again = experiment.run(tmp_path, seeds=1, quick=True)
    assert again["rows_reused"] == len(runs) - len(experiment.E_PRIMES)
    for r in again["runs"]:
        want = old[(r["label"], r.get("experts"), r.get("bits"))]
        assert math.isclose(r["val_ppl"], want["val_ppl"], rel_tol=1e-6) and r["bytes"] == want["bytes"]

    # a rerun with the same settings loads the cached base model instead of training it
    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(experiment, "train_lm", no_training)
    s, steps = experiment.budget(True)
    folder = tmp_path / "models" / "moe8_s0"
    cfg = GPT.load(folder).config
    got = experiment.cached_model(folder, cfg, (None, None), s, steps, 0)
    assert isinstance(got, GPT)
    with pytest.raises(AssertionError, match="trained again"):  # other settings: trained again
        experiment.cached_model(folder, cfg, (None, None), s, steps + 1, 0)
