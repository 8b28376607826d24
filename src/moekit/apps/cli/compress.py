"""`moekit compress`: shrink the experts of a trained MoE (a moekit GPT or a Hugging Face MoE) by
pruning, merging or mixed-precision quantization, from calibration text, and save the result: a
GPT as a GPT folder; a Hugging Face MoE as its own architecture while it still is one (pruned to
the same number of experts in every layer), in moekit's format otherwise (``moekit.convert.save``);
``moekit.load`` reads every one of them."""

from __future__ import annotations

import argparse
import inspect
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch import Tensor, nn

from moekit._checks import arg_number
from moekit.apps.cli.command import NONNEG_INT, POS_INT, Command
from moekit.compress import (
    available_compressions,
    compress,
    dedup_bytes,
    domain_batches,
    mcmoe,
    save_compressed,
)
from moekit.compress.hcsmoe import LINKAGES
from moekit.compress.mcmoe import ALLOCATIONS, QUANTIZERS
from moekit.compress.method import METHODS
from moekit.convert import save as save_converted
from moekit.data import TokenStream, by_split, load_corpus, load_tokenizer
from moekit.io import check_target
from moekit.layer import MoE
from moekit.loader import describe, load
from moekit.models import GPT
from moekit.models.gpt import MODEL_KIND

__all__ = ["add_arguments", "compress_from_args", "COMMAND"]

#: the method that takes ``--bits`` (every other one takes ``--experts``)
QUANTIZING = "mc-moe"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model folder moekit.load reads that has MoE layers: a moekit "
                                                  "GPT (GPT.save / `moekit train`) or a Hugging Face MoE (Mixtral...)")
    p.add_argument("--method", required=True, choices=available_compressions(),
                   help="the compression: pruning (prune-*, reap, naee, easy-ep, seer), merging (hc-smoe, merge-*) or "
                        "mixed precision (mc-moe)")
    p.add_argument("--out", required=True, help="new folder for the compressed model")
    p.add_argument("--experts", type=POS_INT, default=None, help="experts kept per MoE layer, E' (every method but "
                                                                 "mc-moe); at least the model's top-k")
    p.add_argument("--bits", type=arg_number(1, 3), default=None, help="mc-moe: average bits per expert weight (default 2.5)")
    p.add_argument("--scope", choices=["layer", "global"], default=None,
                   help="pruning by a score: E' in every layer, or the best experts over all layers (default layer)")
    p.add_argument("--linkage", choices=list(LINKAGES), default=None,
                   help="hc-smoe, merge-uniform: clustering linkage (default average)")
    p.add_argument("--allocation", choices=list(ALLOCATIONS), default=None,
                   help="mc-moe: how the bits are shared among the experts (default pmq)")
    p.add_argument("--group", type=POS_INT, default=None, help="mc-moe: weights per quantization group (default 64)")
    p.add_argument("--quantizer", choices=list(QUANTIZERS), default=None,
                   help="mc-moe: gptq (default; error feedback from calibration inputs) or rtn (round to nearest)")
    p.add_argument("--attention-bits", type=int, choices=[4, 8], default=None,
                   help="mc-moe: also pack a moekit GPT's attention projections at this width (paper: 4)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json of the text (default: in --model or beside it)")
    p.add_argument("--data", default="wiki", help="calibration and validation text: 'wiki' (bundled corpus), a file, "
                                                  "a folder, or JSONL")
    p.add_argument("--domain", default=None, help="calibrate on one domain only, as FIELD=VALUE (language=fr, "
                                                  "topic_en=science...)")
    p.add_argument("--calibration-tokens", type=POS_INT, default=8192, help="calibration tokens (training split)")
    p.add_argument("--eval-tokens", type=NONNEG_INT, default=16384,
                   help="held-out tokens for the perplexity before and after (validation split; 0: none)")
    p.add_argument("--seq-len", type=arg_number(2, integer=True), default=128, help="tokens per window")
    p.add_argument("--batch-size", type=POS_INT, default=8, help="windows per forward pass")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of the random methods (prune-random, "
                                                             "merge-random, mc-moe allocation random; default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _settings(args: argparse.Namespace) -> dict:
    """The method's settings from the flags, each flag checked against what the method takes."""
    params = inspect.signature(METHODS.get(args.method)).parameters
    if args.method == QUANTIZING:
        if args.experts is not None:
            raise ValueError("--experts: mc-moe keeps every expert and quantizes it; give --bits instead")
        given = {"bits": 2.5 if args.bits is None else args.bits}
    else:
        if args.bits is not None:
            raise ValueError(f"--bits: {args.method} does not quantize; give --experts (or use --method mc-moe)")
        if args.experts is None:
            raise ValueError(f"--experts: {args.method} needs the number of experts to keep per layer, e.g. --experts 4")
        given = {"num_experts": args.experts}
    if args.attention_bits is not None and args.method != QUANTIZING:
        raise ValueError(f"--attention-bits: only mc-moe quantizes; {args.method} keeps attention as it is")
    flags = {"scope": args.scope, "linkage": args.linkage, "allocation": args.allocation, "group": args.group,
             "quantizer": args.quantizer}
    for name, value in flags.items():
        if value is not None:
            if name not in params:
                raise ValueError(f"--{name}: {args.method} takes no {name}; drop the flag")
            given[name] = value
    if "seed" in params:
        given["seed"] = args.seed
    return given


def _moe_layers(model: nn.Module, path: str) -> dict[str, MoE]:
    moes = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
    if not moes:
        raise ValueError(f"--model {path}: {type(model).__name__} has no MoE layer to compress; give an MoE "
                         "(a moekit GPT with experts, or a Mixtral/Qwen-MoE/OLMoE folder)")
    return moes


def _check_experts(args: argparse.Namespace, moes: dict[str, MoE]) -> None:
    if args.experts is None:
        return
    for name, m in moes.items():
        k = getattr(m.gate, "k", 1)
        if args.experts < k:
            raise ValueError(f"--experts {args.experts} is below the top-k {k} of layer {name!r}: a token could not "
                             f"keep its {k} experts; use --experts >= {k}")
    most = max(m.num_experts for m in moes.values())
    if args.experts >= most:
        raise ValueError(f"--experts {args.experts}: the model has at most {most} experts per layer, so nothing would "
                         f"be removed; use --experts < {most}")


def _tokenizer_path(args: argparse.Namespace, model_path: Path) -> Path:
    for p in ([Path(args.tokenizer)] if args.tokenizer else
              [model_path / "tokenizer.json", model_path.parent / "tokenizer.json"]):
        if p.exists():
            return p
    raise FileNotFoundError(f"no tokenizer.json in {model_path} or beside it; pass --tokenizer")


def _max_len(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None)


class Text:
    """The calibration batches (training split, or one domain of it) and the validation windows."""

    def __init__(self, args: argparse.Namespace, tokenizer, seq_len: int) -> None:
        splits = by_split(load_corpus(args.data))
        n = max(1, args.calibration_tokens // seq_len)
        if args.domain is not None:
            field, sep, value = args.domain.partition("=")
            if not sep or not value:
                raise ValueError(f"--domain {args.domain!r}: expected FIELD=VALUE, e.g. language=fr")
            self.calibration = domain_batches(splits["train"], tokenizer, field, value, seq_len, n, args.batch_size)
        else:
            if not splits["train"]:
                raise ValueError(f"--data {args.data}: no training documents for calibration; give more text")
            stream = TokenStream.from_documents(splits["train"], tokenizer, "calibration text")
            stream.check_fits(seq_len, "calibration text")
            self.calibration = list(stream.chunks(seq_len, n)[0].split(args.batch_size))
        self.validation = None
        windows = args.eval_tokens // seq_len
        if windows and splits["validation"]:
            val = TokenStream.from_documents(splits["validation"], tokenizer, "validation text")
            if len(val) > seq_len:
                x, y, _ = val.chunks(seq_len, windows)
                self.validation = (x, y)


def logits_of(model: nn.Module, ids: Tensor) -> Tensor:
    """``[B, T, V]`` next-token logits of a moekit GPT or a transformers causal LM."""
    out = model(ids) if isinstance(model, GPT) else model(input_ids=ids)
    return out if isinstance(out, Tensor) else out.logits


def _run(model: nn.Module, batch: Tensor) -> Tensor:
    return logits_of(model, batch)


@torch.no_grad()
def perplexity(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 8) -> float:
    """Per-token perplexity of ``model`` on the windows ``x`` with targets ``y``, in eval mode."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        logits = logits_of(model, x[i : i + batch_size]).float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), y[i : i + batch_size].reshape(-1), reduction="sum"))
        count += y[i : i + batch_size].numel()
    return math.exp(nll / count)


def _compress(args: argparse.Namespace, model: nn.Module, batches: list[Tensor], settings: dict) -> dict:
    """Compress in place with a progress bar over the calibration batches; returns what mc-moe allocated."""
    with Progress(TextColumn("[bold]calibration"), BarColumn(), MofNCompleteColumn(),
                  disable=args.no_progress) as bar:
        twice = args.method == QUANTIZING and args.attention_bits is not None and settings.get("quantizer") != "rtn"
        task = bar.add_task("calibration", total=len(batches) * (2 if twice else 1))  # GPTQ attention: a 2nd pass

        def run(m: nn.Module, b: Tensor) -> Tensor:
            bar.advance(task)
            return _run(m, b)

        if args.method == QUANTIZING:
            method = mcmoe(model, batches, run, attention_bits=args.attention_bits, **settings)
            return {"bits": method.allocations, **({"attention": method.attention} if args.attention_bits else {})}
        compress(model, args.method, batches, run, **settings)
    return {}


def _save(args: argparse.Namespace, model: nn.Module, settings: dict, tok_path: Path) -> Path:
    if isinstance(model, GPT):
        files = {"tokenizer.json": tok_path.read_bytes()}
        return save_compressed(model, args.out, files) if args.method == QUANTIZING else model.save(args.out, files)
    model_path = Path(args.model)
    own = (model_path / "tokenizer_config.json").is_file() and not args.tokenizer
    model.moekit_convert = {"compression": {"method": args.method, "settings": settings}}
    return save_converted(model, args.out, model_path if own else tok_path)


def compress_from_args(args: argparse.Namespace) -> dict:
    settings = _settings(args)  # flags checked before any slow work
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError(f"--out {args.out} is the --model folder; write the compressed model to a new folder")
    check_target(args.out, MODEL_KIND, "--out")
    info = describe(args.model)
    if info.kind not in ("gpt", "hf"):
        raise ValueError(f"--model {args.model}: a {info.describe()}; compress takes a moekit GPT or a Hugging Face MoE")
    torch.manual_seed(args.seed)
    model = load(args.model)
    moes = _moe_layers(model, args.model)
    _check_experts(args, moes)
    tok_path = _tokenizer_path(args, Path(args.model))
    seq_len = min(args.seq_len, _max_len(model) or args.seq_len)
    text = Text(args, load_tokenizer(tok_path), seq_len)
    before = {"bytes": dedup_bytes(model), "experts": [m.num_experts for m in moes.values()]}
    if text.validation is not None:
        before["val_ppl"] = perplexity(model, *text.validation, args.batch_size)
    extra = _compress(args, model, text.calibration, settings)
    moes = _moe_layers(model, args.model)
    after = {"bytes": dedup_bytes(model), "experts": [m.num_experts for m in moes.values()], **extra}
    if text.validation is not None:
        after["val_ppl"] = perplexity(model, *text.validation, args.batch_size)
    out = _save(args, model, settings, tok_path)
    summary = {"method": args.method, "settings": settings, "before": before, "after": after, "out": str(out),
               "calibration_windows": sum(b.shape[0] for b in text.calibration), "seq_len": seq_len}
    _print_summary(Console(), summary)
    return summary


def _print_summary(console: Console, s: dict) -> None:
    b, a = s["before"], s["after"]
    console.print(f"{s['method']} {s['settings']}: {s['calibration_windows']} calibration windows of {s['seq_len']} "
                  "tokens")
    console.print(f"bytes (deduplicated): {b['bytes']:,} -> {a['bytes']:,} ({a['bytes'] / b['bytes']:.1%})")
    console.print(f"experts per layer: {b['experts']} -> {a['experts']}")
    if "bits" in a:
        console.print("bits per expert: " + "; ".join(f"{n}: {w}" for n, w in a["bits"].items()))
    if "val_ppl" in b:
        console.print(f"validation perplexity: {b['val_ppl']:.3f} -> {a['val_ppl']:.3f}")
    console.print(f"saved: {describe(s['out']).describe()} (load with moekit.load)")


COMMAND = Command(
    help="shrink a trained MoE's experts: pruning, merging (HC-SMoE) or mixed precision (MC-MoE)",
    description="Compress every MoE layer of a moekit GPT or a Hugging Face MoE with a registered method "
    "(moekit.compress), from calibration windows of --data (optionally one --domain), report the bytes, "
    "the experts per layer and the validation perplexity before and after, and save the result to --out "
    "(a moekit GPT folder; a Hugging Face MoE pruned alike in every layer stays its own architecture, one merged, "
    "quantized or pruned unevenly is saved in moekit's format). moekit.load and `moekit generate` read them all.",
    add_arguments=add_arguments, run=compress_from_args,
)
