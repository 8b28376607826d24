"""`moekit experiment dsmoe` (moekit/experiments/dsmoe.py) end to end in quick mode."""

import json

from moekit.cli import main


def test_experiment_dsmoe_quick(tmp_path):
    assert main(["experiment", "dsmoe", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["summary"] and result["wall_s"] > 0
    assert (tmp_path / "dsmoe.png").read_bytes()[:4] == b"\x89PNG"
