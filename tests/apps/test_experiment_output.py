"""What every experiment ends with (moekit/apps/experiments/output.py): the table and results.json."""

import json

from rich.console import Console

from moekit.apps.experiments.output import print_table, write_results


def test_print_table_and_write_results(tmp_path):
    console = Console(record=True, width=100)
    print_table(console, "a title", ("name", "value"), [("first", "1.00"), ("second", "2.00")])
    text = console.export_text()
    assert "a title" in text and "first" in text and "2.00" in text
    drawn = []
    write_results(tmp_path, {"wall_s": 3.2, "x": 1}, console, "fig.png", drawn.append)
    assert json.loads((tmp_path / "results.json").read_text()) == {"wall_s": 3.2, "x": 1}
    assert drawn == [tmp_path / "fig.png"]
    assert f"wrote {tmp_path}/results.json and fig.png (3 s)" in console.export_text().replace("\n", "")
    write_results(tmp_path / "none", {"wall_s": 0.0}, console, "fig.png", None)
    assert (tmp_path / "none" / "results.json").exists() and not (tmp_path / "none" / "fig.png").exists()
