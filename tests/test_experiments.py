"""Each experiment runs end to end in quick mode and writes its table, JSON and figure."""

import json

import pytest

from moekit.cli import main


@pytest.mark.parametrize("name,png", [("dselect", "dselect.png"), ("dsmoe", "dsmoe.png"), ("dynamic-k", "dynamic_k.png")])
def test_experiment_quick(name, png, tmp_path):
    assert main(["experiment", name, "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["summary"] and result["wall_s"] > 0
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_demo_report_includes_experiment_results(tmp_path):
    from moekit.demo import run_demo

    exp = tmp_path / "experiments"
    assert main(["experiment", "dselect", "--quick", "--seeds", "1", "--out", str(exp / "dselect")]) == 0
    run_demo(out=tmp_path / "demo", quick=True, minutes=0.02, progress=False, experiments_dir=exp)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Experiments against the papers" in report and "DSelect-2 static" in report
    assert (tmp_path / "demo" / "experiments" / "dselect.png").exists()
