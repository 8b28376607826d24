"""moekit bench offload: the quick run's figures and report."""

import json

from moekit.apps.bench.offload import report_markdown, run_offload_bench


def test_bench_offload_quick(tmp_path):
    r = run_offload_bench(out=tmp_path / "offload.json", model_path=str(tmp_path / "model"), quick=True)
    assert all(x["matches_simulator"] for x in r["served"] if "matches_simulator" in x)
    assert all(x["max_abs_logit_diff"] <= 1e-4 for x in r["served"])
    by = {(x["policy"], x["budget"]): x for x in r["simulated"]}
    for b in r["budgets"]:  # Belady-MIN reads the least of the per-layer policies that admit every miss
        best = by["Belady-MIN, per layer (offline optimum)", b]["loads_per_token"]
        assert all(x["loads_per_token"] >= best - 1e-9 for (p, bb), x in by.items()
                   if bb == b and "global" not in p and "bypass" not in p)
        assert by["Belady-MIN + bypass to the store", b]["loads_per_token"] <= best + 1e-9
    saved = json.loads((tmp_path / "offload.json").read_text())
    assert (tmp_path / "offload.png").read_bytes()[:4] == b"\x89PNG"
    md = report_markdown(saved)
    assert "Belady-MIN" in md and "| batch size |" in md
