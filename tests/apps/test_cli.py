import json
import subprocess
import sys

import pytest

from moekit.apps.cli.main import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "bench" in out and "info" in out


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "layer", "--help"], ["info", "--help"]])
def test_each_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: moekit" in capsys.readouterr().out


def test_info_runs(capsys):
    assert main(["info"]) == 0
    assert "topk" in capsys.readouterr().out


def test_bench_layer_quick_writes_json(tmp_path):
    out = tmp_path / "layer.json"
    assert main(["bench", "layer", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "layer" and len(report["results"]) == 2
    row = report["results"][0]
    assert {"dense (equal active)", "moekit", "HF Mixtral eager"} <= set(row["impls"])
    assert row["ratios"]["forward_vs_dense"] > 0
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_console_entry_point():
    r = subprocess.run([sys.executable, "-m", "moekit", "--help"], capture_output=True, text=True, check=True)
    assert "usage: moekit" in r.stdout


def test_bench_mole_quick_writes_json(tmp_path):
    out = tmp_path / "mole.json"
    assert main(["bench", "mole", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    by = {r["config"]: r for r in report["results"]}
    assert set(by) == {"dense", "moe-ram", "moe-disk", "mole-disk", "mole-disk-unchecked"}
    # MoLE reads exactly layers x experts x d_model x 2 bytes (fp16) for each new token
    assert by["mole-disk"]["bytes_read_per_token"] == report["expected_mole_bytes_per_token"]
    assert by["moe-disk"]["bytes_read_per_token"] > 100 * by["mole-disk"]["bytes_read_per_token"]
    assert by["mole-disk"]["resident_param_bytes"] < by["moe-ram"]["resident_param_bytes"]
