"""The ``moekit`` command line (moekit/apps/cli): the parser assembled from the table of subcommands
and the outcome of a run, then each subcommand module in its own section. The error paths of every
subcommand are in test_cli_errors.py."""

import argparse
import json
import subprocess
import sys

import pytest

from moekit import __version__
from moekit.apps.cli.command import Command, Group
from moekit.apps.cli.experiment import EXPERIMENTS
from moekit.apps.cli.generate import direct_rule
from moekit.apps.cli.main import COMMANDS, build_parser, main
from moekit.offload import available_policies

# ----------------------------------------------------------------------------------- main: parser and outcome


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


def _table_paths(commands, prefix=()):
    for name, command in commands.items():
        yield (*prefix, name)
        if isinstance(command, Group):
            yield from _table_paths(command.commands, (*prefix, name))


@pytest.mark.parametrize("path", list(_table_paths(COMMANDS)), ids=" ".join)
def test_every_command_in_the_table_has_help(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: moekit {' '.join(path)} ") and "--debug" in out
    command = COMMANDS[path[0]] if len(path) == 1 else COMMANDS[path[0]].commands[path[1]]
    description = getattr(command, "description", None)  # a group has none
    if description:
        assert description.split()[0] in out


def _options(parser: argparse.ArgumentParser, path=()):
    """``(command path, action)`` of every option of every (sub)command."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _options(sub, (*path, name))
        elif a.option_strings:
            yield path, a


def test_every_option_has_help_and_its_default_is_shown(capsys):
    options = list(_options(build_parser()))
    assert len(options) > 80
    assert [(" ".join(path), a.option_strings[0]) for path, a in options if not a.help] == []
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "tokens per calibration and tuning sequence (default: 128)" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    with pytest.raises(SystemExit):
        main(["bench", "offload", "--help"])
    out = capsys.readouterr().out
    assert "25/50/75% of" in out and "%%" not in out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moekit {__version__}"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_the_parser_holds_the_table_in_order():
    top = _subcommands(build_parser())
    assert list(top) == list(COMMANDS)
    assert list(_subcommands(top["bench"])) == list(COMMANDS["bench"].commands)


def _failing(error: BaseException | None):
    def run(args: argparse.Namespace) -> None:
        if error is not None:
            raise error

    return run


@pytest.mark.parametrize("error,code,message", [
    (None, 0, None),
    (ValueError("--size 3: too\n  big"), 1, "moekit toy: error: --size 3: too big"),
    (FileNotFoundError("no such file"), 1, "moekit toy: error: no such file"),
    (RuntimeError("oops"), 1, "moekit toy: error: RuntimeError: oops"),
    (KeyboardInterrupt(), 130, "moekit toy: interrupted"),
])
def test_a_command_is_one_table_line_and_its_outcome_one_exit_status(error, code, message, monkeypatch, capsys):
    toy = Command(help="a toy", add_arguments=lambda p: p.add_argument("--size", type=int, default=1),
                  run=_failing(error))
    monkeypatch.setitem(COMMANDS, "toy", toy)
    assert main(["toy", "--size", "3"]) == code
    err = capsys.readouterr().err
    assert (err == "") if message is None else err.splitlines()[0] == message
    if isinstance(error, RuntimeError):
        assert "run again with --debug" in err
    if error is not None:
        with pytest.raises(type(error)):
            main(["toy", "--debug"])


def test_console_entry_point():
    r = subprocess.run([sys.executable, "-m", "moekit", "--help"], capture_output=True, text=True, check=True)
    assert "usage: moekit" in r.stdout


# ----------------------------------------------------------------------------------- info


def test_info_runs(capsys):
    assert main(["info"]) == 0
    assert "topk" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- generate


def test_direct_rule_takes_a_positive_k_or_cost():
    assert direct_rule("cost") == "cost" and direct_rule("3") == 3
    for bad in ("0", "-2", "1.5", "costs"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an int K >= 1 or 'cost'"):
            direct_rule(bad)


def test_generate_offers_the_policies_usable_without_lookahead():
    gen = _subcommands(build_parser())["generate"]
    policy = next(a for a in gen._actions if a.dest == "policy")
    assert list(policy.choices) == available_policies(online=True) and "belady" not in policy.choices


# ----------------------------------------------------------------------------------- experiment


def test_every_experiment_runs_and_reports():
    for name, module in EXPERIMENTS.items():
        assert callable(module.run) and callable(module.report_markdown), name


# ----------------------------------------------------------------------------------- bench mole


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
