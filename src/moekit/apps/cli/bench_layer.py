"""`moekit bench layer`: moekit.MoE against the Hugging Face Mixtral block and a dense FFN, eager and compiled."""

from __future__ import annotations

import argparse

import torch

from moekit.apps.bench.layer import run_layer_bench
from moekit.apps.cli.command import POS_INT, Command
from moekit.io import check_report_target
from moekit.loader import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke test)")
    parser.add_argument("--repeats", type=POS_INT, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--out", default="runs/bench/layer.json", help="JSON output path")
    parser.add_argument("--threads", type=POS_INT, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the layers run")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers block")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile rows (compiling adds 10-20 s per case on a 2-core CPU)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc malloc's thresholds alone (see moekit.apps.bench.timing.keep_freed_memory)")


def run(args: argparse.Namespace) -> None:
    check_report_target(args.out, "--out", "layer")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_layer_bench(quick=args.quick, repeats=args.repeats, out=args.out, hf=not args.no_hf,
                    malloc_tuning=not args.no_malloc_tuning, device=device, compiled=not args.no_compile)


COMMAND = Command(
    help="moekit.MoE vs HF Mixtral eager block vs dense FFN of equal active parameters",
    description="Forward and forward+backward tokens/s of moekit.MoE (eager and torch.compile), the transformers "
    "Mixtral block (eager) with the same weights, a dense SwiGLU FFN with the same active parameters (eager and "
    "compiled), and moekit's expert FFNs alone (the layer's ceiling).",
    add_arguments=add_arguments, run=run,
)
