"""`moekit convert`: a dense model (moekit GPT checkpoint or Hugging Face folder) into an MoE, on disk."""

from __future__ import annotations

import argparse
import inspect
import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from moekit._checks import arg_number
from moekit.apps.cli.command import Command
from moekit.convert import available_methods, fit_routers, method_class, save, tune
from moekit.convert.export import FORMATS
from moekit.convert.refactor import pregate_of
from moekit.data import by_split, load_corpus, load_tokenizer
from moekit.io import check_target
from moekit.loader import describe, load
from moekit.models import GPT
from moekit.models.gpt import MODEL_KIND
from moekit.routers import available_routers
from moekit.train import fine_tune

POS_INT, NONNEG_INT = arg_number(1, integer=True), arg_number(0, integer=True)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=available_methods(), required=True,
                   help="a registered conversion method: partition (DSMoE), refactor (Read-ME), upcycle, or prune "
                        "(the baseline)")
    p.add_argument("--model", required=True,
                   help="a moekit GPT checkpoint folder (GPT.save / `moekit train`) or a Hugging Face model folder")
    p.add_argument("--out", required=True, help="folder for the converted model")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json for the calibration text, copied to --out (default: in --model, or beside it "
                        "as `moekit train` writes it; a Hugging Face folder's own tokenizer files are copied)")
    p.add_argument("--data", default="wiki", help="calibration and tuning text: 'wiki' (bundled corpus), a file, "
                                                  "a folder, or JSONL")
    p.add_argument("--calibration-tokens", type=POS_INT, default=16384, help="calibration tokens (per domain for refactor)")
    p.add_argument("--seq-len", type=arg_number(2, integer=True), default=128,
                   help="tokens per calibration and tuning sequence")
    p.add_argument("--experts", type=POS_INT, default=8, help="experts per FFN (partition, upcycle)")
    p.add_argument("--router", default=None, help="router name (default: sigmoid_ste for partition, topk for upcycle)")
    p.add_argument("--k", type=POS_INT, default=2, help="experts per token for top-k routers")
    p.add_argument("--sparsity", type=arg_number(0), default=None, help="SigmoidSTE sparsity coefficient (default: 1/layers)")
    p.add_argument("--grouping", choices=["contiguous", "cluster"], default="contiguous",
                   help="partition: experts as contiguous blocks of hidden channels (DSMoE) or balanced clusters")
    p.add_argument("--features", choices=["weights", "activations"], default="activations",
                   help="what clustering compares (grouping=cluster)")
    p.add_argument("--fit-router", action="store_true", help="fit the router by least squares on calibration text")
    p.add_argument("--keep", type=arg_number(0, 1, lo_open=True), default=0.5, help="active fraction of each FFN (refactor, prune)")
    p.add_argument("--domains", default="language", help="refactor: document field whose values are the domains "
                                                         "(language or topic)")
    p.add_argument("--max-domains", type=arg_number(2, integer=True), default=4, help="refactor: at most this many (the largest) domains")
    p.add_argument("--rounds", type=NONNEG_INT, default=2, help="refactor: alternating router/expert rounds")
    p.add_argument("--router-steps", type=NONNEG_INT, default=30, help="refactor: PreGate distillation steps per round")
    p.add_argument("--tune-steps", type=NONNEG_INT, default=0,
                   help="LM fine-tuning steps (refactor: per round; others: in all; moekit GPT and *ForCausalLM)")
    p.add_argument("--batch-size", type=POS_INT, default=16, help="sequences per tuning step")
    p.add_argument("--lr", type=arg_number(0, lo_open=True), default=3e-4, help="learning rate of LM fine-tuning")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of the calibration sample, routers and tuning")
    p.add_argument("--format", choices=list(FORMATS), default="auto",
                   help="how the result is written: auto (Hugging Face-native, e.g. Mixtral, when every layer maps "
                        "exactly, else moekit's format; a moekit GPT stays a GPT folder), hf (HF-native, or an error "
                        "naming what does not map) or moekit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load_model(path: Path) -> nn.Module:
    """The dense model to convert: a moekit GPT, or a Hugging Face folder loaded as the class its
    config names (causal LMs and encoders such as BERT alike)."""
    info = describe(path)
    if info.kind in ("mole", "converted"):
        raise ValueError(f"--model {path}: a {info.describe()}; convert takes a dense model (a moekit GPT or a "
                         "Hugging Face folder)")
    if info.kind == "gpt":
        return load(path)
    import transformers

    cls = getattr(transformers, info.architecture or "", None)
    return (cls if isinstance(cls, type) else transformers.AutoModel).from_pretrained(str(path))


def _tokenizer_path(args, model_path: Path) -> Path:
    """``--tokenizer``, else the model's ``tokenizer.json`` (in the folder, or beside it as `moekit train` writes it)."""
    for p in ([Path(args.tokenizer)] if args.tokenizer else
              [model_path / "tokenizer.json", model_path.parent / "tokenizer.json"]):
        if p.exists():
            return p
    raise FileNotFoundError(f"no tokenizer.json in {model_path} or beside it; pass --tokenizer")


def _tokenizer_out(args, model_path: Path, found: Path):
    """What the output carries: a Hugging Face folder's own tokenizer files, else the tokenizer.json used."""
    if not args.tokenizer and (model_path / "tokenizer_config.json").is_file():
        return model_path
    return found


def _windows(docs, tokenizer, seq_len: int, tokens: int) -> torch.Tensor:
    ids: list[int] = []
    for i in range(0, len(docs), 256):  # encode only as much text as needed
        for enc in tokenizer.encode_batch([d.text for d in docs[i : i + 256]]):
            ids.extend(enc.ids)
        if len(ids) >= tokens:
            break
    n = min(len(ids), tokens) // seq_len
    if n == 0:
        raise ValueError(f"calibration text too small: {len(ids)} tokens for windows of {seq_len}; give more text")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _lm_loss(model: nn.Module):
    if isinstance(model, GPT):
        return lambda m, x, y: m.loss(x, y)
    if type(model).__name__.endswith("ForCausalLM"):
        return lambda m, x, y: m(input_ids=x, labels=x).loss
    return None


def _domains(args, docs, tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """Calibration windows per domain: the ``--max-domains`` largest values of the ``--domains`` field."""
    field = args.domains
    counts = Counter(getattr(d, field, None) for d in docs)
    names = [n for n, _ in counts.most_common(args.max_domains) if n is not None]
    if len(names) < 2:
        raise ValueError(f"--domains {field}: the text has fewer than 2 distinct values ({names}); "
                         "use another field or more text")
    return {n: _windows([d for d in docs if getattr(d, field) == n], tokenizer, seq_len, args.calibration_tokens)
            for n in names}


class _Text:
    """The text a conversion reads: calibration windows, per-domain windows, random tuning batches."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, model_path: Path) -> None:
        self.args = args
        self.tokenizer_path = _tokenizer_path(args, model_path)
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        cfg = getattr(model, "config", None)
        max_len = getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", args.seq_len)
        self.seq_len = min(args.seq_len, max_len)
        self.docs = by_split(load_corpus(args.data))["train"]
        self.calibration = _windows(self.docs, self.tokenizer, self.seq_len, args.calibration_tokens)
        self.stream = self.calibration.reshape(-1)

    def domains(self) -> dict[str, torch.Tensor]:
        return _domains(self.args, self.docs, self.tokenizer, self.seq_len)

    def batches(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of the calibration text: inputs and next-token targets."""
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step)
        starts = torch.randint(0, self.stream.numel() - self.seq_len - 1, (self.args.batch_size,), generator=g)
        w = self.stream[starts[:, None] + torch.arange(self.seq_len + 1)]
        return w[:, :-1], w[:, 1:]


def _router_args(router: str, args: argparse.Namespace, n_layers: int) -> dict:
    rargs = {"k": args.k} if router == "topk" else {}
    if router == "sigmoid_ste":
        rargs["sparsity"] = args.sparsity if args.sparsity is not None else 1.0 / n_layers
    return rargs


def _method(args: argparse.Namespace, model: nn.Module, text: _Text):
    """The ``--method`` conversion with the flags its constructor takes (the router's default is the method's)."""
    cls = method_class(args.method)
    params = inspect.signature(cls).parameters
    offered = {"num_experts": lambda: args.experts, "k": lambda: args.k, "grouping": lambda: args.grouping,
               "features": lambda: args.features, "keep": lambda: args.keep, "seed": lambda: args.seed,
               "calibration": lambda: text.calibration, "domains": text.domains,
               "progress": lambda: not args.no_progress}
    kwargs = {name: get() for name, get in offered.items() if name in params}
    if "router" in params:
        kwargs["router"] = args.router or params["router"].default
        n_layers = getattr(model.config, "n_layers", None) or getattr(model.config, "num_hidden_layers", 1)
        if "router_args" in params:
            kwargs["router_args"] = _router_args(kwargs["router"], args, n_layers)
    return cls(**kwargs)


def _has_pregate(model: nn.Module) -> bool:
    try:
        pregate_of(model)
    except ValueError:
        return False
    return True


def _tune(args: argparse.Namespace, new: nn.Module, text: _Text) -> None:
    """Fine-tuning after the conversion: Read-ME's alternating rounds for a pre-gated model, else plain LM steps."""
    lm, progress = _lm_loss(new), not args.no_progress
    if _has_pregate(new):
        if args.rounds and (args.router_steps or args.tune_steps):
            tune(new, text.batches, rounds=args.rounds, router_steps=args.router_steps,
                 expert_steps=args.tune_steps if lm is not None else 0, expert_lr=args.lr, lm_loss=lm,
                 progress=progress)
    elif args.tune_steps:
        if lm is None:
            raise ValueError(f"--tune-steps: no LM loss for {type(new).__name__}; fine-tune it in your own loop")
        fine_tune(new, text.batches, args.tune_steps, args.lr, lm, progress=progress)


def _check_hf_format(args: argparse.Namespace) -> None:
    """``--format hf`` needs top-k routing: refused before any slow work when the method routes otherwise."""
    params = inspect.signature(method_class(args.method)).parameters
    router = args.router or (params["router"].default if "router" in params else None)
    if args.format == "hf" and router != "topk":
        what = f"routes with {router}" if router else "has no router"
        raise ValueError(f"--format hf: {args.method} {what}; only top-k routing (--router topk) maps onto a "
                         "transformers architecture: use --format auto or moekit")


def convert_from_args(args: argparse.Namespace) -> nn.Module:
    if args.router is not None and args.router not in available_routers():  # before any slow work
        raise ValueError(f"--router {args.router!r}: unknown; valid names are {available_routers()}")
    _check_hf_format(args)
    if "num_experts" in inspect.signature(method_class(args.method)).parameters and args.k > args.experts:
        raise ValueError(f"--k {args.k} must be <= --experts {args.experts}")
    check_target(args.out, MODEL_KIND, "--out")
    torch.manual_seed(args.seed)
    model_path = Path(args.model)
    model = _load_model(model_path).eval()
    text = _Text(args, model, model_path)
    new = _method(args, model, text).convert(model)
    if args.fit_router:
        fit_routers(new, text.calibration)
    _tune(args, new, text)
    out = save(new, args.out, tokenizer=_tokenizer_out(args, model_path, text.tokenizer_path), format=args.format)
    total = sum(p.numel() for p in new.parameters())
    native = json.loads((out / "config.json").read_text()).get("architectures")
    how = f"as {native[0]}, which transformers loads too" if native else "in moekit's format"
    print(f"{args.method}: {type(model).__name__} -> {total / 1e6:.2f}M parameters; saved to {out} {how} "
          f"(load with moekit.convert.load)")
    return new


COMMAND = Command(
    help="turn a dense model (moekit GPT or Hugging Face) into an MoE: partition, refactor, upcycle",
    description="Dense to MoE: partition (DSMoE: the FFN cut into experts, SigmoidSTE router), refactor "
    "(Read-ME: per-domain channel masks, a residual expert and a pre-gating router trained by distillation), "
    "upcycle (copies of the FFN and a fresh router) or prune (the structured-pruning baseline). Calibration "
    "and tuning text come from --data; the result is saved with moekit.convert.save (see --format), with the "
    "model's tokenizer.",
    add_arguments=add_convert_arguments, run=convert_from_args,
)
