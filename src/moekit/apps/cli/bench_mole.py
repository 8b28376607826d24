"""`moekit bench mole`: MoLE against a dense model and an MoE in RAM or on disk."""

from __future__ import annotations

import argparse

from moekit.apps.bench.mole import run_mole_bench
from moekit.apps.cli.command import Command
from moekit.io import check_report_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller vocabulary and fewer tokens (smoke test)")
    parser.add_argument("--out", default="runs/bench/mole.json", help="JSON output path")


def run(args: argparse.Namespace) -> None:
    check_report_target(args.out, "--out", "mole")
    run_mole_bench(out=args.out, quick=args.quick)


COMMAND = Command(
    help="MoLE vs dense vs MoE in RAM vs MoE with experts on disk: decode, prefill, memory, bytes read",
    description="Decode latency, prefill tokens/s, resident bytes, peak RSS and bytes read per token of a dense "
    "model, a top-2 MoE in RAM, the same MoE with experts read from disk (page cache dropped before each "
    "read) and MoLE with its lookup table on disk; one spawned process per model.",
    add_arguments=add_arguments, run=run,
)
