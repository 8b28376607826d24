"""`moekit info`: the version, and the routers and expert backends available here."""

from __future__ import annotations

import argparse

import torch

from moekit import __version__
from moekit.apps.cli.command import Command
from moekit.experts import GroupedExperts, available_backends, select_backend
from moekit.routers import available_routers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``moekit info`` takes no arguments."""


def run(args: argparse.Namespace) -> None:
    print(f"moekit {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("routers:", ", ".join(available_routers()))
    print("expert backends:", ", ".join(available_backends()))
    experts = GroupedExperts(4, 64, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        chosen = select_backend(torch.zeros(1, 64, dtype=dtype), experts.to(dtype)).name
        print(f"  cpu {str(dtype).removeprefix('torch.')}: {chosen}")


COMMAND = Command(help="version, routers and expert backends available here", add_arguments=add_arguments, run=run)
