"""`moekit experiment dynamic-k` (moekit/apps/experiments/dynamic_k.py) end to end in quick mode."""

import json
import math
import statistics

from moekit.apps.cli.main import main


def test_experiment_dynamic_k_quick(tmp_path):
    assert main(["experiment", "dynamic-k", "--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["seeds"] == 2 and result["steps"] == 40  # the quick settings
    names = ["top-2", "DA-MoE dynamic K (1..4, mean 2)"]
    assert [r["variant"] for r in result["summary"]] == names
    assert sorted((r["variant"], r["seed"]) for r in result["runs"]) == sorted((n, s) for n in names for s in (0, 1))
    for row in result["summary"]:  # the summary is the mean and population SD of the runs
        ppl = [r["val_ppl"] for r in result["runs"] if r["variant"] == row["variant"]]
        assert math.isclose(row["val_ppl"], statistics.mean(ppl)) and math.isclose(row["val_ppl_sd"],
                                                                                  statistics.pstdev(ppl))
        assert all(1 < p < 1024 for p in ppl)  # below a uniform guess over the quick vocabulary
    for r in result["runs"]:
        ks = [layer["mean_experts"] for layer in r["layers"]]
        if r["variant"] == "top-2":
            assert all(math.isclose(k, 2.0) for k in ks)  # exactly two experts with a weight per token
        else:
            assert all(1.0 <= k <= 4.0 for k in ks)
    for layer in result["k_vs_importance"]:  # the K rule: within [1, 4], non-decreasing in importance
        pairs = sorted(zip(layer["importance"], layer["k"]))
        assert all(1 <= k <= 4 for _, k in pairs)
        assert all(a[1] <= b[1] for a, b in zip(pairs, pairs[1:]) if a[0] < b[0])
    assert (tmp_path / "dynamic_k.png").read_bytes()[:4] == b"\x89PNG"
