"""`moekit bench parallel`: expert parallelism over gloo, bytes exchanged and step time."""

from __future__ import annotations

import argparse

from moekit._checks import arg_number
from moekit.apps.bench.parallel import run_parallel_bench
from moekit.apps.cli.command import POS_INT, Command
from moekit.io import check_report_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", type=arg_number(2, integer=True), default=2, help="processes (>= 2)")
    parser.add_argument("--steps", type=POS_INT, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--quick", action="store_true", help="a small model and 3 steps (smoke test)")
    parser.add_argument("--out", default="runs/bench/parallel.json", help="JSON output path")


def run(args: argparse.Namespace) -> None:
    check_report_target(args.out, "--out", "parallel")
    run_parallel_bench(out=args.out, world=args.world, steps=args.steps, quick=args.quick)


COMMAND = Command(
    help="expert parallelism over gloo: bytes exchanged vs the lower bound, step time 1 vs N processes",
    description="Trains the demo's top-2 MoE GPT on one global batch in one process and in --world processes "
    "(data + expert parallel, spawned, gloo on loopback); prints bytes sent per layer and step against "
    "tokens x k x d_model x 4 bytes each way, and the median step time.",
    add_arguments=add_arguments, run=run,
)
