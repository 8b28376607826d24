"""`moekit generate`: continue a prompt with a saved moekit GPT, in memory or with its experts
served from disk through a cache (``--offload``)."""

from __future__ import annotations

import argparse
import sys

import torch

from moekit._checks import arg_number
from moekit.apps.cli.command import NONNEG_INT, POS_INT, Command
from moekit.data import load_tokenizer
from moekit.models import GPT
from moekit.offload import Engine, available_policies, find_tokenizer, parse_budget


def direct_rule(text: str) -> int | str:
    """``--direct``'s value: an int K >= 1, or ``cost``."""
    if text == "cost":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected an int K >= 1 or 'cost', got {text!r}")
    return k


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a folder written by GPT.save (moekit train / moekit demo)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=POS_INT, default=64, help="tokens to generate")
    parser.add_argument("--temperature", type=arg_number(0), default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=NONNEG_INT, default=None, help="sampling seed")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the model)")
    parser.add_argument("--offload", action="store_true", help="serve the experts from disk through a cache")
    parser.add_argument("--store", default=None, help="expert store folder (default: MODEL/experts)")
    parser.add_argument("--budget", default="25%", help="cache size: 25%% of the experts, or 64MiB, or bytes")
    parser.add_argument("--policy", default="lru", choices=available_policies(online=True), help="eviction policy")
    parser.add_argument("--partition", default="layer", choices=["layer", "global"], help="one pool per layer or one")
    parser.add_argument("--prefetch", default="none", choices=["none", "gate"],
                        help="gate: the next layer's router predicts its experts, loaded while this layer computes")
    parser.add_argument("--low-threshold", type=arg_number(0, 1), default=None,
                        help="mixed precision: misses with a gate weight below this use the expert's int8 copy")
    parser.add_argument("--direct", type=direct_rule, default=None, metavar="K|cost",
                        help="Fiddler's rule: once the cache is full, a missed expert that fewer than K tokens need "
                             "is computed on the CPU where it is stored instead of evicting a cached one; cost: K "
                             "measured per layer at start-up (needs --device cuda or --host ram)")
    parser.add_argument("--device", default="cpu", help="where the expert cache lives and the model runs (cpu, cuda)")
    parser.add_argument("--host", default="disk", choices=["disk", "ram"],
                        help="where the experts are kept: read from the store on every load, or all read once into RAM")


def run(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.offload:
        _generate_offloaded(args, tokenizer)
        return
    if args.direct is not None or args.device != "cpu" or args.host != "disk":
        raise SystemExit("moekit generate: --direct, --device and --host apply to --offload serving; add --offload")
    _generate_in_memory(args, tokenizer)


def _generate_offloaded(args: argparse.Namespace, tokenizer) -> None:
    """The continuation on stdout; the cache's counters on stderr."""
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


def _generate_in_memory(args: argparse.Namespace, tokenizer) -> None:
    model = GPT.load(args.model).eval()
    tokenizer = tokenizer or find_tokenizer(args.model)
    if tokenizer is None:
        raise SystemExit(f"moekit generate: no tokenizer.json in {args.model} or its parent; pass --tokenizer")
    ids = torch.tensor([tokenizer.encode(args.prompt).ids])
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    with torch.no_grad():
        out = model.generate(ids, args.max_new_tokens, args.temperature, gen)
    print(args.prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist()))


COMMAND = Command(
    help="continue a prompt with a saved moekit GPT, optionally with its experts on disk",
    description="Greedy (or sampled) continuation of --prompt. With --offload the experts stay on disk in an "
    "expert store (written beside the model on first use) and a cache of --budget holds the ones in use.",
    add_arguments=add_arguments, run=run,
)
