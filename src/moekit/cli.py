"""The ``moekit`` command line. ``moekit --help`` lists the subcommands; each has its own ``--help``."""

from __future__ import annotations

import argparse
import sys


def _cmd_bench_layer(args: argparse.Namespace) -> int:
    import torch

    from .bench.layer import run_layer_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    run_layer_bench(quick=args.quick, repeats=args.repeats, out=args.out, hf=not args.no_hf,
                    malloc_tuning=not args.no_malloc_tuning)
    return 0


def _cmd_bench_mole(args: argparse.Namespace) -> int:
    from .bench.mole import run_mole_bench

    run_mole_bench(out=args.out, quick=args.quick)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .experts import GroupedExperts, available_backends, select_backend
    from .routers import available_routers

    print(f"moekit {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("routers:", ", ".join(available_routers()))
    print("expert backends:", ", ".join(available_backends()))
    experts = GroupedExperts(4, 64, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        chosen = select_backend(torch.zeros(1, 64, dtype=dtype), experts.to(dtype)).name
        print(f"  cpu {str(dtype).removeprefix('torch.')}: {chosen}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import rerender_report, run_demo

    if args.report_only:
        print(f"report: {rerender_report(args.out, args.experiments)}")
        return 0
    run_demo(out=args.out, quick=args.quick, minutes=args.minutes, data=args.data, seed=args.seed,
             variants=args.variants, experiments_dir=args.experiments)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.cli import train_from_args

    train_from_args(args)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert.cli import convert_from_args

    convert_from_args(args)
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f".experiments.{EXPERIMENTS[args.name]}", __package__)
    kw = {} if args.seeds is None else {"seeds": args.seeds}
    module.run(out=args.out or f"runs/experiments/{args.name}", quick=args.quick, **kw)
    return 0


EXPERIMENTS = {"dselect": "dselect", "dsmoe": "dsmoe", "dynamic-k": "dynamic_k", "convert-gpt": "convert_gpt",
               "convert-minilm": "convert_minilm"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit", description="Mixture-of-experts toolkit for PyTorch.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    info = sub.add_parser("info", help="version, routers and expert backends available here")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser(
        "demo", help="train and compare MoE variants on the bundled corpus; write a report",
        description="Train every variant at equal active parameters and equal tokens, measure quality, "
        "speed, memory and expert load, and write report.md, figures and results.json.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="tiny models and data, under 90 s (smoke test)")
    demo.add_argument("--minutes", type=float, default=None, help="training budget for all variants together")
    demo.add_argument("--data", default=None, help="text file, folder or JSONL instead of the bundled corpus")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--variants", nargs="+", default=None, help="train only these variants")
    demo.add_argument("--experiments", default="runs/experiments",
                      help="folder of `moekit experiment` results to include in the report")
    demo.add_argument("--report-only", action="store_true",
                      help="no training: write report.md again from --out's results.json and the latest experiments")
    demo.set_defaults(func=_cmd_demo)

    from .train.cli import add_train_arguments

    train = sub.add_parser(
        "train", help="train a GPT (dense or MoE) on the bundled corpus or your text",
        description="Train moekit.models.GPT with AdamW, warmup + cosine, MoE auxiliary losses, "
        "checkpoints and exact --resume.",
    )
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)

    from .convert.cli import add_convert_arguments

    conv = sub.add_parser(
        "convert", help="turn a dense model (moekit GPT or Hugging Face) into an MoE: partition, refactor, upcycle",
        description="Dense to MoE: partition (DSMoE: the FFN cut into experts, SigmoidSTE router), refactor "
        "(Read-ME: per-domain channel masks, a residual expert and a pre-gating router trained by distillation), "
        "upcycle (copies of the FFN and a fresh router) or prune (the structured-pruning baseline). Calibration "
        "and tuning text come from --data; the result is saved with moekit.convert.save.",
    )
    add_convert_arguments(conv)
    conv.set_defaults(func=_cmd_convert)

    exp = sub.add_parser(
        "experiment", help="check a method against its paper (table, JSON, PNG)",
        description="Run one experiment: several seeds, a printed table, results.json and a PNG.",
    )
    exp.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    exp.add_argument("--out", default=None, help="output folder (default runs/experiments/NAME)")
    exp.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the experiment's)")
    exp.add_argument("--quick", action="store_true", help="small data and few epochs (smoke test)")
    exp.set_defaults(func=_cmd_experiment)

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    layer = bsub.add_parser(
        "layer",
        help="moekit.MoE vs HF Mixtral eager block vs dense FFN of equal active parameters",
        description="Forward and forward+backward tokens/s of moekit.MoE, the transformers Mixtral block "
        "(eager) with the same weights, and a dense SwiGLU FFN with the same active parameters.",
    )
    layer.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke test)")
    layer.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    layer.add_argument("--out", default="runs/bench/layer.json", help="JSON output path")
    layer.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    layer.add_argument("--no-hf", action="store_true", help="skip the transformers block")
    layer.add_argument("--no-malloc-tuning", action="store_true",
                       help="leave glibc malloc's thresholds alone (see moekit.bench.timing.keep_freed_memory)")
    layer.set_defaults(func=_cmd_bench_layer)
    mole = bsub.add_parser(
        "mole", help="MoLE vs dense vs MoE in RAM vs MoE with experts on disk: decode, prefill, memory, bytes read",
        description="Decode latency, prefill tokens/s, resident bytes, peak RSS and bytes read per token of a dense "
        "model, a top-2 MoE in RAM, the same MoE with experts read from disk (page cache dropped before each "
        "read) and MoLE with its lookup table on disk; one spawned process per model.",
    )
    mole.add_argument("--quick", action="store_true", help="smaller vocabulary and fewer tokens (smoke test)")
    mole.add_argument("--out", default="runs/bench/mole.json", help="JSON output path")
    mole.set_defaults(func=_cmd_bench_mole)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
