"""`moekit demo`: train and compare the MoE variants, or write the report again (``--report-only``)."""

from __future__ import annotations

import argparse

from moekit._checks import arg_number
from moekit.apps.cli.command import NONNEG_INT, Command
from moekit.apps.demo import rerender_report, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny models and data, under 90 s (smoke test)")
    parser.add_argument("--minutes", type=arg_number(0, lo_open=True), default=None,
                        help="training budget for all variants together")
    parser.add_argument("--data", default=None, help="text file, folder or JSONL instead of the bundled corpus")
    parser.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of every variant's initialisation and batches")
    parser.add_argument("--variants", nargs="+", default=None, help="train only these variants")
    parser.add_argument("--experiments", default="runs/experiments",
                        help="folder of `moekit experiment` results to include in the report")
    parser.add_argument("--report-only", action="store_true",
                        help="no training: write report.md again from --out's results.json and the latest experiments")


def run(args: argparse.Namespace) -> None:
    if args.report_only:
        print(f"report: {rerender_report(args.out, args.experiments)}")
        return
    run_demo(out=args.out, quick=args.quick, minutes=args.minutes, data=args.data, seed=args.seed,
             variants=args.variants, experiments_dir=args.experiments)


COMMAND = Command(
    help="train and compare MoE variants on the bundled corpus; write a report",
    description="Train every variant at equal active parameters and equal tokens, measure quality, "
    "speed, memory and expert load, and write report.md, figures and results.json.",
    add_arguments=add_arguments, run=run,
)
