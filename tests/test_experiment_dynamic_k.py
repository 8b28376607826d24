"""`moekit experiment dynamic-k` (moekit/experiments/dynamic_k.py) end to end in quick mode."""

import json

from moekit.cli import main


def test_experiment_dynamic_k_quick(tmp_path):
    assert main(["experiment", "dynamic-k", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["summary"] and result["wall_s"] > 0
    assert (tmp_path / "dynamic_k.png").read_bytes()[:4] == b"\x89PNG"
