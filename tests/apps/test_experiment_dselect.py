"""`moekit experiment dselect` (moekit/apps/experiments/dselect.py): the summary by hand, then end to end in quick mode."""

import json
import math
import statistics
import struct
from pathlib import Path

import pytest

from moekit.apps.cli.main import main
from moekit.apps.experiments.dselect import GATES, report_markdown, summarize

STATIC = "DSelect-2 static γ=0.1"


def test_summarize_hand_values():
    runs = [
        {"dataset": "digits", "gate": "top-2", "seed": 0, "metric": [0.5, 0.7], "nonzero": [[4, 2], [2, 2]],
         "changes": [None, 0.25]},
        {"dataset": "digits", "gate": "top-2", "seed": 1, "metric": [0.7, 0.9], "nonzero": [[3, 3], [2, 1]],
         "changes": [None, 0.75]},
        {"dataset": "digits", "gate": "softmax (MMoE)", "seed": 0, "metric": [0.4, 0.4], "nonzero": [[8, 8]],
         "changes": [None]},
    ]
    rows = summarize(runs)
    assert [(r["dataset"], r["gate"]) for r in rows] == [("digits", "softmax (MMoE)"), ("digits", "top-2")]
    soft, top = rows
    assert soft["metric_name"] == "accuracy" and soft["metric"] == pytest.approx(0.4) and soft["metric_sd"] == 0
    assert soft["nonzero_end"] == 8 and soft["changed_end"] == 0.0  # a single epoch has no change: counted 0
    assert top["metric"] == pytest.approx(0.7) and top["metric_sd"] == pytest.approx(0.1)  # means 0.6, 0.8
    assert top["per_task"] == pytest.approx([0.6, 0.8])
    assert top["nonzero_end"] == pytest.approx(1.75) and top["changed_end"] == pytest.approx(0.5)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_result(result: dict, seeds: int, epochs: int, n_test: dict) -> None:
    """What follows from the setup: every run once, shapes, possible ranges, the summary recomputed."""
    assert result["experiment"] == "dselect" and result["seeds"] == seeds
    assert result["epochs"] == {"synthetic": epochs, "digits": epochs}
    assert 0 < result["wall_s"] < 3600
    runs = result["runs"]
    # every (data set, gate, seed) once
    assert sorted((r["dataset"], r["gate"], r["seed"]) for r in runs) == sorted(
        (d, g, s) for d in ("synthetic", "digits") for g in GATES for s in range(seeds))
    tasks = {"synthetic": 8, "digits": 2}  # 4 pairs of regression tasks; two digits per image
    for r in runs:
        d, T = r["dataset"], tasks[r["dataset"]]
        assert len(r["metric"]) == T and len(r["nonzero"]) == epochs and len(r["changes"]) == epochs
        assert all(len(nz) == T for nz in r["nonzero"])
        for m in r["metric"]:
            assert math.isfinite(m)
            if d == "digits":  # an accuracy over n_test examples: a multiple of 1/n_test in [0, 1]
                assert 0 <= m <= 1 and m * n_test[d] == pytest.approx(round(m * n_test[d]), abs=1e-3)
            else:
                assert 0 < m < 100
        assert r["changes"][0] is None and all(0 <= c <= 1 for c in r["changes"][1:])
        nz = [v for epoch in r["nonzero"] for v in epoch]
        if r["gate"] == "softmax (MMoE)":  # dense gate: every expert every epoch
            assert nz == [8.0] * len(nz) and r["changes"][1:] == [0.0] * (epochs - 1)
        elif r["gate"] == "top-2":
            assert nz == [2.0] * len(nz)
        else:
            assert all(1 <= v <= 8 for v in nz)
            if r["gate"] == STATIC:  # one gate per task, shared by every example: a whole number of experts,
                assert all(v == int(v) for v in nz)  # and a changed set changes for all examples of its task
                assert all(c * T == pytest.approx(round(c * T), abs=1e-9) for c in r["changes"][1:])
    # the summary is the seeds' mean of each run's task mean
    summary = result["summary"]
    assert [(s["dataset"], s["gate"]) for s in summary] == [(d, g) for d in ("digits", "synthetic") for g in GATES]
    for s in summary:
        rs = [r for r in runs if r["dataset"] == s["dataset"] and r["gate"] == s["gate"]]
        means = [statistics.mean(r["metric"]) for r in rs]
        assert s["metric_name"] == ("accuracy" if s["dataset"] == "digits" else "MSE")
        assert s["metric"] == pytest.approx(statistics.mean(means))
        assert s["metric_sd"] == pytest.approx(statistics.pstdev(means))
        assert s["nonzero_end"] == pytest.approx(statistics.mean(statistics.mean(r["nonzero"][-1]) for r in rs))
        assert s["changed_end"] == pytest.approx(statistics.mean(r["changes"][-1] for r in rs))


def test_experiment_dselect_quick(tmp_path):
    assert main(["experiment", "dselect", "--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    check_result(result, seeds=2, epochs=4, n_test={"synthetic": 1000, "digits": 500})  # quick mode's sizes
    width, height = _png_size(tmp_path / "dselect.png")
    assert width > height > 100
    md = report_markdown(result)
    assert "2 seeds" in md and md.count("\n| ") == 1 + len(result["summary"])


def test_committed_results_are_consistent():
    """docs/experiments/dselect/results.json: the full run (3 seeds, 12 epochs, 2000 test examples)."""
    result = json.loads((Path(__file__).parents[2] / "docs/experiments/dselect/results.json").read_text())
    check_result(result, seeds=3, epochs=12, n_test={"synthetic": 2000, "digits": 2000})
