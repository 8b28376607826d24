"""`moekit experiment convert-gpt` (moekit/apps/experiments/convert_gpt.py): the summary by hand."""

import pytest

from moekit.apps.experiments.convert_gpt import report_markdown, summarize


def test_summarize_by_hand_keeps_the_order_variants_ran_in():
    runs = [{"variant": "dense", "seed": 0, "val_ppl": 10.0, "active_fraction": 1.0},
            {"variant": "pruned", "seed": 0, "val_ppl": 12.0, "active_fraction": 0.5, "ppl_before": 30.0},
            {"variant": "dense", "seed": 1, "val_ppl": 14.0, "active_fraction": 1.0},
            {"variant": "pruned", "seed": 1, "val_ppl": 16.0, "active_fraction": 0.5, "ppl_before": 40.0,
             "locality": 0.9}]
    dense, pruned = summarize(runs)
    assert dense["variant"] == "dense" and dense["val_ppl"] == 12.0 and dense["val_ppl_sd"] == pytest.approx(2.0)
    assert dense["ppl_before"] is None and dense["locality"] is None and dense["router_agreement"] is None
    assert pruned["ppl_before"] == 35.0 and pruned["active_fraction"] == 0.5 and pruned["locality"] is None
    md = report_markdown({"summary": [dense, pruned], "pretrain_steps": 3, "pretrained_ppl": 50.0, "steps": 2,
                          "router_steps": 1})
    assert "| dense | 100% | — | 12.00 | — |" in md and "| pruned | 50% | 35.0 | 14.00 | — |" in md
