"""The ``moekit`` command line. ``moekit --help`` lists the subcommands; each has its own ``--help``.

A user's mistake (a bad flag, a missing or damaged file, a folder that is not moekit's, a run that
diverged) ends in one or two lines naming the argument or file and the fix, with a non-zero exit
status; ``--debug`` (or ``MOEKIT_DEBUG=1``) shows the traceback instead.

Each subcommand is a module of this package (its arguments and what it runs, see
:mod:`moekit.apps.cli.command`); :data:`COMMANDS` lists them in the order ``--help`` shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch.distributed as dist

from moekit import __version__
from moekit.apps.cli import bench, compress, convert, demo, experiment, export, generate, info, train
from moekit.apps.cli.command import Command, Group
from moekit.parallel import exit_now
from moekit.train.trainer import TrainingDiverged

#: ``moekit COMMAND``: every subcommand, in the order ``moekit --help`` lists them
COMMANDS: dict[str, Command | Group] = {
    "info": info.COMMAND,
    "demo": demo.COMMAND,
    "train": train.COMMAND,
    "convert": convert.COMMAND,
    "compress": compress.COMMAND,
    "export": export.COMMAND,
    "experiment": experiment.COMMAND,
    "generate": generate.COMMAND,
    "bench": bench.COMMAND,
}


class _Formatter(argparse.HelpFormatter):
    """Help that shows each option's default (unless the help text already says it, or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS)
                or action.required):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with a two-line usage error (the message, then where to read more)."""
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _add_commands(parser: argparse.ArgumentParser, commands: dict[str, Command | Group], dest: str) -> None:
    """One subparser per entry of ``commands``, its name stored in ``args.<dest>``; a group's own
    subcommands under it, their name stored in ``args.<group name>``."""
    sub = parser.add_subparsers(dest=dest, metavar=dest.upper())
    sub.required = True
    for name, command in commands.items():
        p = sub.add_parser(name, help=command.help, description=getattr(command, "description", None),
                           formatter_class=_Formatter)
        if isinstance(command, Group):
            _add_commands(p, command.commands, name)
        else:
            command.add_arguments(p)
            p.set_defaults(func=command.run)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moekit", description="Mixture-of-experts toolkit for PyTorch.", formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"moekit {__version__}")
    _add_commands(p, COMMANDS, "command")
    return p


def _add_debug(p: argparse.ArgumentParser) -> None:
    """``--debug`` on every (sub)command: show the traceback of an error."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error (or set MOEKIT_DEBUG=1)")
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _add_debug(sub)


#: errors that are the user's to fix (their message names the argument or file and the fix)
USER_ERRORS = (ValueError, OSError)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    _add_debug(p)
    args = p.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("MOEKIT_DEBUG", "") not in ("", "0")
    name = " ".join(["moekit", args.command, *([args.bench] if getattr(args, "bench", None) else [])])
    code = _run(args, name, debug)
    if dist.is_available() and dist.is_initialized():  # a torchrun worker: end without the interpreter's teardown
        dist.destroy_process_group()
        exit_now(code)
    return code


def _run(args: argparse.Namespace, name: str, debug: bool) -> int:
    """Run the subcommand: 0, or 1 with a one-line error (130 when interrupted)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = show
        try:
            args.func(args)
            return 0
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if debug:
                raise
            if isinstance(e, (*USER_ERRORS, TrainingDiverged)):
                print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
            else:
                print(f"{name}: error: {type(e).__name__}: {_one_line(e)}\n(unexpected: run again with --debug for the "
                      "traceback, and please report it)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
