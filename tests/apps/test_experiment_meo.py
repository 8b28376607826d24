"""`moekit experiment meo` (moekit/apps/experiments/meo.py) end to end in quick mode."""

import json
import math
import statistics

from moekit.apps.cli.main import main


def test_experiment_meo_quick(tmp_path):
    assert main(["experiment", "meo", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["seeds"] == 1 and result["steps"] == 12
    arms = [r["arm"] for r in result["summary"]]
    assert len(arms) == 6 and sum(a.startswith("MEO") for a in arms) == 2
    assert (tmp_path / "meo.png").is_file()
    by_arm = {r["arm"]: r for r in result["runs"]}
    for r in result["runs"]:
        assert set(r["ppl_by_task"]) == {"en", "es", "fr"}
        # every language gets the same number of full windows, so the overall perplexity is the
        # geometric mean of the three languages'
        geo = math.exp(statistics.mean(math.log(v) for v in r["ppl_by_task"].values()))
        assert math.isclose(r["val_ppl"], geo, rel_tol=1e-9)
    meo = next(r for a, r in by_arm.items() if a.startswith("MEO, weights merged ("))
    mixed = next(r for a, r in by_arm.items() if a.startswith("task-level"))
    assert meo["params"] == mixed["params"] and meo["ffn_width"] == 1 and mixed["ffn_width"] == 2
    row = result["summary"][0]
    assert math.isclose(row["val_ppl"], statistics.mean(r["val_ppl"] for r in result["runs"] if r["arm"] == row["arm"]))
