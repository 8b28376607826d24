"""The ``moekit`` command line. ``moekit --help`` lists the subcommands; each has its own ``--help``.

A user's mistake (a bad flag, a missing or damaged file, a folder that is not moekit's, a run that
diverged) ends in one or two lines naming the argument or file and the fix, with a non-zero exit
status; ``--debug`` (or ``MOEKIT_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from moekit._checks import arg_number

POS_INT, NONNEG_INT = arg_number(1, integer=True), arg_number(0, integer=True)


def _cmd_bench_layer(args: argparse.Namespace) -> int:
    import torch

    from moekit.apps.bench.layer import run_layer_bench
    from moekit.io import check_report_target

    check_report_target(args.out, "--out", "layer")

    if args.threads:
        torch.set_num_threads(args.threads)
    run_layer_bench(quick=args.quick, repeats=args.repeats, out=args.out, hf=not args.no_hf,
                    malloc_tuning=not args.no_malloc_tuning)
    return 0


def _cmd_bench_mole(args: argparse.Namespace) -> int:
    from moekit.apps.bench.mole import run_mole_bench
    from moekit.io import check_report_target

    check_report_target(args.out, "--out", "mole")

    run_mole_bench(out=args.out, quick=args.quick)
    return 0


def _cmd_bench_offload(args: argparse.Namespace) -> int:
    from moekit.apps.bench.offload import run_offload_bench
    from moekit.io import check_report_target

    check_report_target(args.out, "--out", "offload")
    png = Path(args.out).with_suffix(".png")  # the figure beside it: only where moekit's report already stands
    if png.exists() and not Path(args.out).exists():
        raise FileExistsError(f"--out {args.out}: {png} exists and is not moekit's; choose another path")
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such folder; give a saved moekit GPT with MoE layers, or "
                                "leave --model out to use (or train) the demo's")

    run_offload_bench(out=args.out, model_path=args.model, sequences=args.sequences, serve_tokens=args.serve_tokens,
                      train_steps=args.train_steps, readme=False if args.no_readme else None, quick=args.quick)
    return 0


def _direct_rule(text: str) -> int | str:
    if text == "cost":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected an int K >= 1 or 'cost', got {text!r}")
    return k


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from moekit.offload.engine import Engine, find_tokenizer, parse_budget

    tokenizer = None
    if args.tokenizer:
        from moekit.data import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    if args.offload:
        engine = Engine(args.model, args.store, parse_budget(args.budget), tokenizer, policy=args.policy,
                        partition=args.partition, prefetch=None if args.prefetch == "none" else args.prefetch,
                        low_threshold=args.low_threshold, direct=args.direct, device=args.device, host=args.host)
        print(args.prompt + engine.generate(args.prompt, args.max_new_tokens, args.temperature, args.seed))
        st = engine.stats()
        engine.close()
        print(f"[{st.tokens} tokens; expert cache {st.resident_bytes / 2**20:.1f} MiB of "
              f"{engine.server.store.total_bytes() / 2**20:.1f} MiB; hit rate {st.hit_rate:.1%}; "
              f"{st.bytes_per_token / 2**10:,.0f} KiB read per token; {st.low_bit} misses served int8; "
              f"{st.direct} computed from the store]", file=sys.stderr)
        return 0
    if args.direct is not None or args.device != "cpu" or args.host != "disk":
        raise SystemExit("moekit generate: --direct, --device and --host apply to --offload serving; add --offload")
    from moekit.models import GPT

    model = GPT.load(args.model).eval()
    tokenizer = tokenizer or find_tokenizer(args.model)
    if tokenizer is None:
        raise SystemExit(f"moekit generate: no tokenizer.json in {args.model} or its parent; pass --tokenizer")
    ids = torch.tensor([tokenizer.encode(args.prompt).ids])
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    with torch.no_grad():
        out = model.generate(ids, args.max_new_tokens, args.temperature, gen)
    print(args.prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    return 0


def _cmd_bench_parallel(args: argparse.Namespace) -> int:
    from moekit.apps.bench.parallel import run_parallel_bench
    from moekit.io import check_report_target

    check_report_target(args.out, "--out", "parallel")

    run_parallel_bench(out=args.out, world=args.world, steps=args.steps, quick=args.quick)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from moekit import __version__
    from moekit.experts import GroupedExperts, available_backends, select_backend
    from moekit.routers import available_routers

    print(f"moekit {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("routers:", ", ".join(available_routers()))
    print("expert backends:", ", ".join(available_backends()))
    experts = GroupedExperts(4, 64, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        chosen = select_backend(torch.zeros(1, 64, dtype=dtype), experts.to(dtype)).name
        print(f"  cpu {str(dtype).removeprefix('torch.')}: {chosen}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from moekit.apps.demo import rerender_report, run_demo

    if args.report_only:
        print(f"report: {rerender_report(args.out, args.experiments)}")
        return 0
    run_demo(out=args.out, quick=args.quick, minutes=args.minutes, data=args.data, seed=args.seed,
             variants=args.variants, experiments_dir=args.experiments)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from moekit.apps.cli.train import train_from_args

    train_from_args(args)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from moekit.apps.cli.convert import convert_from_args

    convert_from_args(args)
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    import importlib

    from moekit.io import MANIFEST, claim_folder, record_files

    module = importlib.import_module(f"moekit.apps.experiments.{EXPERIMENTS[args.name]}")
    kw = {} if args.seeds is None else {"seeds": args.seeds}
    out = claim_folder(args.out or f"runs/experiments/{args.name}", "experiment", "--out")
    module.run(out=out, quick=args.quick, **kw)
    record_files(out, "experiment", sorted(p.name for p in out.iterdir()
                                           if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")))
    return 0


EXPERIMENTS = {"dselect": "dselect", "dsmoe": "dsmoe", "dynamic-k": "dynamic_k", "convert-gpt": "convert_gpt",
               "convert-minilm": "convert_minilm", "mole-embeddings": "mole_embeddings"}


class _Parser(argparse.ArgumentParser):
    """argparse with a two-line usage error (the message, then where to read more)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moekit", description="Mixture-of-experts toolkit for PyTorch.")
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
    demo.add_argument("--minutes", type=arg_number(0, lo_open=True), default=None,
                      help="training budget for all variants together")
    demo.add_argument("--data", default=None, help="text file, folder or JSONL instead of the bundled corpus")
    demo.add_argument("--seed", type=NONNEG_INT, default=0)
    demo.add_argument("--variants", nargs="+", default=None, help="train only these variants")
    demo.add_argument("--experiments", default="runs/experiments",
                      help="folder of `moekit experiment` results to include in the report")
    demo.add_argument("--report-only", action="store_true",
                      help="no training: write report.md again from --out's results.json and the latest experiments")
    demo.set_defaults(func=_cmd_demo)

    from moekit.apps.cli.train import add_train_arguments

    train = sub.add_parser(
        "train", help="train a GPT (dense or MoE) on the bundled corpus or your text",
        description="Train moekit.models.GPT with AdamW, warmup + cosine, MoE auxiliary losses, "
        "checkpoints and exact --resume.",
    )
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)

    from moekit.apps.cli.convert import add_convert_arguments

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
    exp.add_argument("--seeds", type=POS_INT, default=None, help="number of seeds (default: the experiment's)")
    exp.add_argument("--quick", action="store_true", help="small data and few epochs (smoke test)")
    exp.set_defaults(func=_cmd_experiment)

    gen = sub.add_parser(
        "generate", help="continue a prompt with a saved moekit GPT, optionally with its experts on disk",
        description="Greedy (or sampled) continuation of --prompt. With --offload the experts stay on disk in an "
        "expert store (written beside the model on first use) and a cache of --budget holds the ones in use.",
    )
    gen.add_argument("--model", required=True, help="a folder written by GPT.save (moekit train / moekit demo)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=POS_INT, default=64)
    gen.add_argument("--temperature", type=arg_number(0), default=0.0, help="0: greedy")
    gen.add_argument("--seed", type=NONNEG_INT, default=None, help="sampling seed")
    gen.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the model)")
    gen.add_argument("--offload", action="store_true", help="serve the experts from disk through a cache")
    gen.add_argument("--store", default=None, help="expert store folder (default: MODEL/experts)")
    gen.add_argument("--budget", default="25%", help="cache size: 25%% of the experts, or 64MiB, or bytes")
    gen.add_argument("--policy", default="lru", choices=["lru", "lfu"], help="eviction policy")
    gen.add_argument("--partition", default="layer", choices=["layer", "global"], help="one pool per layer or one")
    gen.add_argument("--prefetch", default="none", choices=["none", "gate"],
                     help="gate: the next layer's router predicts its experts, loaded while this layer computes")
    gen.add_argument("--low-threshold", type=arg_number(0, 1), default=None,
                     help="mixed precision: misses with a gate weight below this use the expert's int8 copy")
    gen.add_argument("--direct", type=_direct_rule, default=None, metavar="K|cost",
                     help="Fiddler's rule: once the cache is full, a missed expert that fewer than K tokens need is "
                          "computed on the CPU where it is stored instead of evicting a cached one; cost: K measured "
                          "per layer at start-up (needs --device cuda or --host ram)")
    gen.add_argument("--device", default="cpu", help="where the expert cache lives and the model runs (cpu, cuda)")
    gen.add_argument("--host", default="disk", choices=["disk", "ram"],
                     help="where the experts are kept: read from the store on every load, or all read once into RAM")
    gen.set_defaults(func=_cmd_generate)

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
    layer.add_argument("--repeats", type=POS_INT, default=None, help="timed runs per measurement (median)")
    layer.add_argument("--out", default="runs/bench/layer.json", help="JSON output path")
    layer.add_argument("--threads", type=POS_INT, default=None, help="torch threads (default: torch's)")
    layer.add_argument("--no-hf", action="store_true", help="skip the transformers block")
    layer.add_argument("--no-malloc-tuning", action="store_true",
                       help="leave glibc malloc's thresholds alone (see moekit.apps.bench.timing.keep_freed_memory)")
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
    off = bsub.add_parser(
        "offload", help="expert cache policies x budgets on real routing traces; the model served from disk",
        description="Records the routing of the demo's trained top-2 MoE on held-out text, simulates LRU, LFU, "
        "Belady with lookahead and Belady-MIN at 25/50/75%% of the experts' bytes (exact counters), then serves the "
        "model from an on-disk expert store through the cache and checks its counters and logits.",
    )
    off.add_argument("--model", default=None,
                     help="a saved moekit GPT with MoE layers (default: the demo's moe-top2, else runs/bench/moe-top2, "
                     "trained with the demo's settings if missing)")
    off.add_argument("--sequences", type=POS_INT, default=16, help="held-out sequences in the trace")
    off.add_argument("--serve-tokens", type=POS_INT, default=128, help="tokens decoded by the served runtime per policy")
    off.add_argument("--train-steps", type=POS_INT, default=357, help="training steps when the model is missing")
    off.add_argument("--no-readme", action="store_true",
                     help="skip the Read-ME model (the demo's dense GPT refactored by topic, built once in "
                     "runs/bench/readme-topics: about 10 minutes)")
    off.add_argument("--quick", action="store_true", help="a short trace and run, no Read-ME model (smoke test)")
    off.add_argument("--out", default="runs/bench/offload.json", help="JSON output path (the plot goes beside it)")
    off.set_defaults(func=_cmd_bench_offload)
    par = bsub.add_parser(
        "parallel", help="expert parallelism over gloo: bytes exchanged vs the lower bound, step time 1 vs N processes",
        description="Trains the demo's top-2 MoE GPT on one global batch in one process and in --world processes "
        "(data + expert parallel, spawned, gloo on loopback); prints bytes sent per layer and step against "
        "tokens x k x d_model x 4 bytes each way, and the median step time.",
    )
    par.add_argument("--world", type=arg_number(2, integer=True), default=2, help="processes (>= 2)")
    par.add_argument("--steps", type=POS_INT, default=10, help="timed steps (after 2 warm-up steps)")
    par.add_argument("--quick", action="store_true", help="a small model and 3 steps (smoke test)")
    par.add_argument("--out", default="runs/bench/parallel.json", help="JSON output path")
    par.set_defaults(func=_cmd_bench_parallel)
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
    if getattr(args, "expert_parallel", None):  # a torchrun worker: end without the interpreter's teardown
        import torch.distributed as dist

        from moekit.parallel import exit_now

        if dist.is_initialized():
            dist.destroy_process_group()
        exit_now(code)
    return code


def _run(args: argparse.Namespace, name: str, debug: bool) -> int:
    from moekit.train.trainer import TrainingDiverged

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = show
        try:
            return args.func(args)
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
