"""`moekit bench offload`: expert cache policies and budgets on real routing traces, and the model
served from disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.apps.bench.offload import run_offload_bench
from moekit.apps.cli.command import POS_INT, Command
from moekit.io import check_report_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a saved moekit GPT with MoE layers (default: the demo's moe-top2, else "
                        "runs/bench/moe-top2, trained with the demo's settings if missing)")
    parser.add_argument("--sequences", type=POS_INT, default=16, help="held-out sequences in the trace")
    parser.add_argument("--serve-tokens", type=POS_INT, default=128,
                        help="tokens decoded by the served runtime per policy")
    parser.add_argument("--train-steps", type=POS_INT, default=357, help="training steps when the model is missing")
    parser.add_argument("--no-readme", action="store_true",
                        help="skip the Read-ME model (the demo's dense GPT refactored by topic, built once in "
                        "runs/bench/readme-topics: about 10 minutes)")
    parser.add_argument("--quick", action="store_true", help="a short trace and run, no Read-ME model (smoke test)")
    parser.add_argument("--out", default="runs/bench/offload.json", help="JSON output path (the plot goes beside it)")


def run(args: argparse.Namespace) -> None:
    check_report_target(args.out, "--out", "offload")
    png = Path(args.out).with_suffix(".png")  # the figure beside it: only where moekit's report already stands
    if png.exists() and not Path(args.out).exists():
        raise FileExistsError(f"--out {args.out}: {png} exists and is not moekit's; choose another path")
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such folder; give a saved moekit GPT with MoE layers, or "
                                "leave --model out to use (or train) the demo's")
    run_offload_bench(out=args.out, model_path=args.model, sequences=args.sequences, serve_tokens=args.serve_tokens,
                      train_steps=args.train_steps, readme=False if args.no_readme else None, quick=args.quick)


COMMAND = Command(
    help="expert cache policies x budgets on real routing traces; the model served from disk",
    description="Records the routing of the demo's trained top-2 MoE on held-out text, simulates LRU, LFU, "
    "Belady with lookahead and Belady-MIN at 25/50/75% of the experts' bytes (exact counters), then serves the "
    "model from an on-disk expert store through the cache and checks its counters and logits.",
    add_arguments=add_arguments, run=run,
)
