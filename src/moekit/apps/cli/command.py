"""What a ``moekit`` subcommand is: the record the parser is assembled from, and the argument types
the subcommands share.

A subcommand module defines ``add_arguments(parser)``, ``run(args)`` and a :class:`Command` that
names them with its help; ``run`` does the work and raises on failure (``moekit.apps.cli.main``
turns the exception into a one-line error and an exit status).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from moekit._checks import arg_number

POS_INT, NONNEG_INT = arg_number(1, integer=True), arg_number(0, integer=True)


@dataclass(frozen=True)
class Command:
    """A subcommand: its line in the parent's ``--help``, its parser's description, the arguments it
    adds to its parser and the function it runs with the parsed arguments."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], object]
    description: str | None = None


@dataclass(frozen=True)
class Group:
    """A subcommand made of subcommands (``moekit bench NAME``)."""

    help: str
    commands: dict[str, Command]
