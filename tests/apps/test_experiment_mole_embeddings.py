"""`moekit experiment mole-embeddings` (moekit/apps/experiments/mole_embeddings.py) in quick mode."""

import json

from moekit.apps.cli.main import main


def test_experiment_mole_embeddings_quick(tmp_path):
    assert main(["experiment", "mole-embeddings", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    by = {(r["arm"], r["tied"]): r for r in result["summary"]}
    assert set(by) == {("dense", True), ("dense", False), ("mole", True), ("mole", False)}
    vocab, d_model = 1024, 64  # the quick settings: untying adds exactly one vocab x d_model matrix
    for arm in ("dense", "mole"):
        assert by[(arm, False)]["params"] - by[(arm, True)]["params"] == vocab * d_model
        assert all(0 < by[(arm, t)]["val_ppl"] < vocab for t in (True, False))
