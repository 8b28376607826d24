"""`moekit generate`: continue a prompt with any model moekit loads (:func:`moekit.load`: a moekit GPT,
a MoLE GPT served from its lookup table, a converted model, a Hugging Face folder), in memory or with
its experts served from disk through a cache (``--offload``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moekit._checks import arg_number
from moekit.apps.cli.command import NONNEG_INT, POS_INT, Command
from moekit.io import MANIFEST
from moekit.loader import describe, generate, load, load_tokenizer
from moekit.offload import available_policies, load_offloaded, moe_layers, offload, parse_budget, write_store
from moekit.ops.sampling import Sampling
from moekit.parallel import resolve_device


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
    parser.add_argument("--model", required=True,
                        help="a model folder: moekit GPT (moekit train / demo), MoLE GPT, converted model, or a "
                             "Hugging Face causal LM (dense or MoE)")
    parser.add_argument("--table", default=None,
                        help="a MoLE model's lookup table folder (default: mole_table in or beside --model)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=POS_INT, default=64, help="at most this many new tokens")
    parser.add_argument("--temperature", type=arg_number(0), default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=POS_INT, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=arg_number(0, 1, lo_open=True), default=None,
                        help="sample among the most likely tokens whose probability reaches p (nucleus)")
    parser.add_argument("--eos", default=None,
                        help="stop at these tokens: comma-separated ids or token texts, or 'none' (default: the "
                             "tokenizer's end-of-text token)")
    parser.add_argument("--seed", type=NONNEG_INT, default=None, help="sampling seed")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json or tokenizer folder (default: the model's, in or beside its folder)")
    parser.add_argument("--offload", action="store_true", help="serve the experts from disk through a cache")
    parser.add_argument("--store", default=None,
                        help="expert store folder (default: MODEL/experts for a moekit GPT; required for other "
                             "models: written on first use)")
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
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the model runs and the expert cache lives (auto: cuda when there is one)")
    parser.add_argument("--host", default="disk", choices=["disk", "ram"],
                        help="where the experts are kept: read from the store on every load, or all read once into RAM")


def _eos(text: str | None, tokenizer) -> list[int]:
    """``--eos``: ids or token texts; default: the tokenizer's end-of-sequence tokens."""
    if text is None:
        return tokenizer.eos
    if text.strip().lower() == "none":
        return []
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        i = int(item) if item.isdigit() else tokenizer.token_id(item)
        if i is None:
            raise ValueError(f"--eos {item!r}: not a token of this tokenizer; give its id or 'none'")
        out.append(i)
    return out


def _offloaded(args: argparse.Namespace, device: torch.device):
    """``(model, server)``: the model with its experts on disk behind a cache of ``--budget``."""
    info = describe(args.model, args.table)
    serve = dict(policy=args.policy, partition=args.partition, low_threshold=args.low_threshold, direct=args.direct,
                 device=device, host=args.host, prefetch=None if args.prefetch == "none" else args.prefetch)
    if info.kind == "gpt":
        return load_offloaded(args.model, args.store, parse_budget(args.budget), **serve)
    if info.kind == "mole":
        raise ValueError(f"--offload: {args.model} is a MoLE model; its experts are already read from its table")
    if args.store is None:
        raise ValueError(f"--offload of {info.describe()}: give --store, a new folder for its experts (moekit writes "
                         "no file into a folder it did not write)")
    model = load(args.model, device=device)
    if not moe_layers(model):
        raise ValueError(f"--offload: {args.model} has no MoE layer to offload")
    store = args.store if (Path(args.store) / MANIFEST).exists() else write_store(
        model, args.store, low_bit=args.low_threshold is not None)
    return model, offload(model, store, parse_budget(args.budget), **serve)


def run(args: argparse.Namespace) -> None:
    if not args.offload and (args.direct is not None or args.host != "disk" or args.store is not None):
        raise ValueError("--direct, --host and --store apply to --offload serving; add --offload")
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    model, server = _offloaded(args, device) if args.offload else (
        load(args.model, table=args.table, device=device), None)
    if not args.offload:
        print(f"[{describe(args.model, args.table).describe()}]", file=sys.stderr)
    ids = torch.tensor([tokenizer.encode(args.prompt)])
    if ids.shape[1] == 0:
        raise ValueError("--prompt: it encodes to no token; give some text")
    out = generate(model, ids, args.max_new_tokens, Sampling(args.temperature, args.top_k, args.top_p),
                   _eos(args.eos, tokenizer), args.seed)
    print(args.prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    if server is not None:
        _report(server)


def _report(server) -> None:
    """The cache's counters, on stderr."""
    st = server.stats()
    server.close()
    print(f"[{st.tokens} tokens; expert cache {st.resident_bytes / 2**20:.1f} MiB of "
          f"{server.store.total_bytes() / 2**20:.1f} MiB; hit rate {st.hit_rate:.1%}; "
          f"{st.bytes_per_token / 2**10:,.0f} KiB read per token; {st.low_bit} misses served int8; "
          f"{st.direct} computed from the store]", file=sys.stderr)


COMMAND = Command(
    help="continue a prompt with any saved model (moekit GPT, MoLE, converted, Hugging Face), experts optionally on disk",
    description="Greedy or sampled (--temperature, --top-k, --top-p, --seed) continuation of --prompt, up to "
    "--max-new-tokens or an end-of-sequence token. With --offload the experts stay on disk in an expert store "
    "(written on first use) and a cache of --budget holds the ones in use.",
    add_arguments=add_arguments, run=run,
)
