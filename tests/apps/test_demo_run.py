"""`moekit demo` (moekit/apps/demo/run.py): the quick demo end to end, the report written again, the
checks before any work, and the experiments' results in the report."""

import json

import pytest

from moekit.apps.cli.main import main
from moekit.apps.demo import run_demo


def test_quick_demo_writes_report_and_figures(tmp_path):
    summary = run_demo(out=tmp_path, quick=True, minutes=0.05, progress=False)
    names = {r["variant"] for r in summary["results"]}
    assert {"dense", "moe-top2", "mole"} <= names
    report = (tmp_path / "report.md").read_text()
    assert "| dense |" in report and "| moe-top2 |" in report and "ppl fr" in report
    for fig in ("loss_curves.png", "tradeoffs.png", "expert_load_language.png", "expert_load_topic.png"):
        data = (tmp_path / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, fig
    results = json.loads((tmp_path / "results.json").read_text())
    moe = next(r for r in results["results"] if r["variant"] == "moe-top2")
    dense = next(r for r in results["results"] if r["variant"] == "dense")
    assert moe["params_total"] > dense["params_total"]
    assert abs(moe["params_active"] - dense["params_active"]) / dense["params_active"] < 0.05  # equal active
    assert set(moe["ppl_by_language"]) == {"en", "fr", "es"} and moe["load_imbalance"] >= 1.0
    assert (tmp_path / "variants" / "moe-top2" / "model" / "model.safetensors").exists()
    mole = next(r for r in results["results"] if r["variant"] == "mole")
    assert mole["resident_mb"] < moe["resident_mb"] and mole["offloaded_mb"] > 0
    assert set(mole["mole_tables"]) == {"float16", "int8", "nf4"}
    assert "MoLE lookup tables" in report
    # moe-top2 compressed after training: REAP to 4 experts frees 4 experts and their router rows in each
    # layer (fp32), mc-moe's 2.5-bit codes far less than fp32
    comp = moe["compressed"]
    assert set(comp) == {"uncompressed", "reap, E'=4", "hc-smoe, E'=4", "mc-moe, 2.5 bits"}
    s = results["settings"]
    D, F = s["d_model"], s["d_ff"] // 2
    freed = s["n_layers"] * 4 * (3 * D * F + D) * 4 / 2**20
    assert abs(comp["uncompressed"]["mb"] - comp["reap, E'=4"]["mb"] - freed) < 1e-9
    assert moe["resident_mb"] > comp["reap, E'=4"]["mb"] + 0.9 * freed  # the model measured after keeps its experts
    experts_mb = s["n_layers"] * 8 * 3 * D * F * 4 / 2**20
    assert comp["uncompressed"]["mb"] - experts_mb < comp["mc-moe, 2.5 bits"]["mb"] < comp["uncompressed"]["mb"] \
        - 0.8 * experts_mb
    assert all(1 < c["val_ppl"] < s["vocab_size"] for c in comp.values())
    assert "| moe-top2: reap, E'=4 |" in report
    # the report is written again from results.json and the committed experiments, without training
    (tmp_path / "report.md").unlink()
    assert main(["demo", "--out", str(tmp_path), "--report-only", "--experiments", str(tmp_path / "none")]) == 0
    again = (tmp_path / "report.md").read_text()
    assert "| moe-top2 |" in again and "Experiments against the papers" in again


def test_report_only_needs_a_finished_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--report-only"]) == 1
    assert "run `moekit demo" in capsys.readouterr().err


def test_demo_rejects_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="unknown variants"):
        run_demo(out=tmp_path, quick=True, variants=["nope"], progress=False)


def test_demo_report_includes_experiment_results(tmp_path):
    exp = tmp_path / "experiments"
    assert main(["experiment", "dselect", "--quick", "--seeds", "1", "--out", str(exp / "dselect")]) == 0
    run_demo(out=tmp_path / "demo", quick=True, minutes=0.02, progress=False, experiments_dir=exp)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Experiments against the papers" in report and "DSelect-2 static" in report
    assert (tmp_path / "demo" / "experiments" / "dselect.png").exists()
