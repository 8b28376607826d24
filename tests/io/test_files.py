"""Single files: strict JSON (no NaN), reports never written over a user's file."""

import json

import pytest

from moekit.io import (
    check_report_target,
    dumps,
)


def test_strict_json_and_reports(tmp_path):
    assert json.loads(dumps({"loss": float("nan"), "x": [float("inf"), 1.5]})) == {"loss": None, "x": [None, 1.5]}
    with pytest.raises(ValueError):
        json.dumps(float("nan"), allow_nan=False)  # what dumps avoids
    for text in ('{"mine": 1}', '"notes on my benchmark runs"', '["benchmark"]', '{"benchmark": "mine"}', "{"):
        (tmp_path / "notes.json").write_text(text)
        with pytest.raises(FileExistsError, match="exists and is not a moekit layer report"):
            check_report_target(tmp_path / "notes.json", "--out", "layer")
    with pytest.raises(FileExistsError, match="give a file path ending in .json"):
        check_report_target(tmp_path / "figure.png", "--out", "layer")
    (tmp_path / "bench.json").write_text('{"benchmark": "layer"}')
    check_report_target(tmp_path / "bench.json", "--out", "layer")
    check_report_target(tmp_path / "new.json", "--out", "layer")
