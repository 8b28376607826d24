"""`moekit train`: the command-line front end of :class:`moekit.train.Trainer`.

A new run (``--out`` missing or empty) records every flag that defines it, the model config and a
fingerprint of the training text in the run folder's manifest. ``--resume`` rebuilds the run from
that record: a flag that conflicts with it is refused with the list of differences, except those
whose meaning on resume is well defined (more ``--steps``, another ``--lr``, ``--minutes``,
``--eval-every``, ``--ckpt-every``, ``--max-nonfinite``), which are applied and reported.
"""

from __future__ import annotations

import argparse
import inspect
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from moekit._checks import arg_number
from moekit.apps.cli.command import Command
from moekit.data import TokenStream, by_split, load_corpus, load_tokenizer, train_tokenizer
from moekit.data.corpus import corpus_fingerprint
from moekit.io import check_target, verify
from moekit.models import GPT, GPTConfig
from moekit.parallel import expert_parallel, full_state_dict
from moekit.routers import available_routers, router_class
from moekit.train.trainer import RUN_KIND, TrainConfig, Trainer

#: flags that define a run, with their defaults (None in the parser: "not given")
MODEL_FLAGS = {"ffn": "dense", "experts": 8, "k": 2, "router": "topk", "vocab": 8192, "d_model": 128, "layers": 4,
               "heads": 4, "d_ff": 512}
TRAIN_FLAGS = {"steps": 1000, "minutes": None, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "warmup": 50,
               "eval_every": 100, "ckpt_every": 100, "seed": 0, "max_nonfinite": 3}
#: flags a resumed run may change (applied from the resumed step on)
RESUMABLE_FLAGS = ("steps", "minutes", "lr", "eval_every", "ckpt_every", "max_nonfinite")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    pos_int, nonneg_int = arg_number(1, integer=True), arg_number(0, integer=True)
    p.add_argument("--data", default=None,
                   help="'wiki' (bundled corpus, the default), a text file, a folder, or JSONL with 'text'")
    p.add_argument("--out", required=True, help="run folder: tokenizer, checkpoints, metrics.jsonl, final model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in --out although it holds one (its checkpoints go once the new run "
                        "has written its first)")
    m = p.add_argument_group("model")
    m.add_argument("--ffn", choices=["dense", "moe"], default=None, help="FFN of every layer: dense SwiGLU or a mixture of experts (default: dense)")
    m.add_argument("--experts", type=pos_int, default=None, help="experts per MoE layer (default: 8)")
    m.add_argument("--k", type=pos_int, default=None, help="experts per token (MoE) (default: 2)")
    m.add_argument("--router", default=None, help=f"registered router name, one of {available_routers()} (default: topk)")
    m.add_argument("--vocab", type=arg_number(258, integer=True), default=None,
                   help="tokenizer vocabulary size (default: 8192)")
    m.add_argument("--d-model", type=pos_int, default=None, help="model width (default: 128)")
    m.add_argument("--layers", type=pos_int, default=None, help="transformer blocks (default: 4)")
    m.add_argument("--heads", type=pos_int, default=None, help="attention heads (default: 4)")
    m.add_argument("--d-ff", type=pos_int, default=None, help="dense FFN width; MoE experts get d_ff / k (default: 512)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=pos_int, default=None, help="optimizer steps (default: 1000)")
    t.add_argument("--minutes", type=arg_number(0, lo_open=True), default=None, help="wall-clock budget in minutes: stop at the step that exceeds it (default: none)")
    t.add_argument("--batch-size", type=pos_int, default=None, help="sequences per step (default: 16)")
    t.add_argument("--seq-len", type=arg_number(2, integer=True), default=None,
                   help="tokens per sequence (default: 128)")
    t.add_argument("--lr", type=arg_number(0, lo_open=True), default=None,
                   help="peak AdamW learning rate, then cosine decay (default: 0.003)")
    t.add_argument("--warmup", type=nonneg_int, default=None, help="linear warm-up steps (default: 50)")
    t.add_argument("--eval-every", type=nonneg_int, default=None,
                   help="validation every N steps; 0: only at the end (default: 100)")
    t.add_argument("--ckpt-every", type=nonneg_int, default=None,
                   help="checkpoint every N steps; 0: only at the end (default: 100)")
    t.add_argument("--max-nonfinite", type=pos_int, default=None,
                   help="steps in a row with a NaN/inf loss or gradient (skipped) before the run stops (default: 3)")
    t.add_argument("--seed", type=nonneg_int, default=None, help="seed of the initialisation and the batches (default: 0)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.add_argument("--expert-parallel", type=pos_int, default=None, metavar="N",
                   help="shard the experts over N processes (data + expert parallel); launch with "
                   "torchrun --nproc-per-node N -m moekit train --expert-parallel N ...")


def _init_expert_parallel(n: int) -> int:
    """Join the torchrun process group (gloo on CPU, NCCL on GPU); returns this process's rank."""

    if "WORLD_SIZE" not in os.environ:
        raise SystemExit(f"--expert-parallel {n}: launch with torchrun --nproc-per-node {n} -m moekit train "
                         f"--expert-parallel {n} ...")
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # the trainer runs on the CPU
    if dist.get_world_size() != n:
        raise SystemExit(f"--expert-parallel {n} but torchrun started {dist.get_world_size()} processes; give "
                         "--nproc-per-node the same number")
    return dist.get_rank()


def _given(args: argparse.Namespace, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def model_config(flags: dict, vocab_size: int) -> GPTConfig:
    """The GPT config of a run's model flags (checked: a bad combination fails here, before any slow work)."""
    if flags["router"] not in available_routers():
        raise ValueError(f"--router {flags['router']!r}: unknown; valid names are {available_routers()}")
    if flags["ffn"] == "moe" and flags["k"] > flags["experts"]:
        raise ValueError(f"--k {flags['k']} must be <= --experts {flags['experts']}")
    cfg = GPTConfig(vocab_size=vocab_size, d_model=flags["d_model"], n_layers=flags["layers"], n_heads=flags["heads"],
                    max_seq_len=flags["seq_len"], d_ff=flags["d_ff"])
    if flags["ffn"] == "moe":
        takes_k = "k" in inspect.signature(router_class(flags["router"])).parameters
        cfg = cfg.with_moe(flags["experts"], flags["k"], router=flags["router"],
                           router_args={"k": flags["k"]} if takes_k else {}, d_ff=max(1, flags["d_ff"] // flags["k"]))
    with torch.device("meta"):  # every layer and router built once, on no memory
        GPT(cfg)
    return cfg


def _train_config(flags: dict) -> TrainConfig:
    return TrainConfig(steps=flags["steps"], batch_size=flags["batch_size"], seq_len=flags["seq_len"], lr=flags["lr"],
                       warmup_steps=flags["warmup"], eval_every=flags["eval_every"], ckpt_every=flags["ckpt_every"],
                       minutes=flags["minutes"], seed=flags["seed"], max_nonfinite=flags["max_nonfinite"])


def _resume_plan(args: argparse.Namespace, out: Path) -> tuple[TrainConfig, GPTConfig, dict]:
    """``(train config, model config, manifest)`` of the run in ``out`` with the flags given now
    applied; a flag that conflicts with the run is refused, listing every difference."""
    man = verify(out, RUN_KIND, "give the --out of a run moekit train started, or start a new run without --resume")
    settings = man.get("settings") or {}
    recorded = settings.get("flags")
    if not isinstance(recorded, dict) or "model" not in settings or not isinstance(man.get("config"), dict):
        raise ValueError(f"{out}: the run was not started by `moekit train` (no recorded flags); resume it from Python")
    given = _given(args, [*MODEL_FLAGS, *TRAIN_FLAGS])
    conflicts = [f"--{k.replace('_', '-')} {v} (the run has {recorded.get(k)})" for k, v in given.items()
                 if k not in RESUMABLE_FLAGS and v != recorded.get(k)]
    if args.data is not None and args.data != settings["data"]["source"]:
        conflicts.append(f"--data {args.data} (the run has {settings['data']['source']})")
    if conflicts:
        raise ValueError(f"--resume: {out} was started with other settings: {'; '.join(conflicts)}. Drop these flags "
                         "to continue the run, or start a new one with --overwrite")
    cfg = TrainConfig(**man["config"])
    cfg = replace(cfg, **{k: v for k, v in given.items() if k in RESUMABLE_FLAGS})  # the Trainer reports them
    return cfg, GPTConfig.from_dict(settings["model"]), man


def train_from_args(args: argparse.Namespace) -> GPT:
    out = Path(args.out)
    ep = getattr(args, "expert_parallel", None)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: give one")
    if args.resume:
        train_cfg, model_cfg, man = _resume_plan(args, out)
        data = man["settings"]["data"]["source"]
        moe = any(spec.get("kind") == "moe" for spec in model_cfg.ffn or [])
    else:
        flags = {**MODEL_FLAGS, **TRAIN_FLAGS, **_given(args, [*MODEL_FLAGS, *TRAIN_FLAGS])}
        data = args.data or "wiki"
        model_config(flags, flags["vocab"])  # names and shapes checked before the corpus and the tokenizer
        train_cfg, moe = _train_config(flags), flags["ffn"] == "moe"
        if check_target(out, RUN_KIND, "--out") and not args.overwrite:
            raise FileExistsError(f"--out {out}: holds a moekit training run; continue it with --resume or start a "
                                  "new one in its place with --overwrite")
    if ep and not moe:
        raise ValueError("--expert-parallel needs --ffn moe")
    rank = _init_expert_parallel(ep) if ep else 0
    docs = by_split(load_corpus(data))
    if not docs["validation"]:
        raise ValueError(f"--data {data}: no validation documents; give more text")
    fingerprint = corpus_fingerprint(docs)
    if args.resume:
        if fingerprint != man["settings"]["data"]["fingerprint"]:
            raise ValueError(f"--resume: the text of --data {data} changed since the run started (fingerprint "
                             f"{fingerprint[:12]}, the run's {man['settings']['data']['fingerprint'][:12]}); restore "
                             "it, or start a new run with --overwrite")
        tokenizer = load_tokenizer(out / "tokenizer.json")
        if tokenizer.get_vocab_size() != model_cfg.vocab_size:
            raise ValueError(
                f"{out}/tokenizer.json has {tokenizer.get_vocab_size()} tokens but the run's model has "
                f"vocab_size={model_cfg.vocab_size}; resume with the tokenizer the run was started with"
            )
        settings = man["settings"]
    else:
        if ep and rank:  # rank 0 trains the tokenizer once; the others read it from the cache
            dist.barrier()
        tokenizer, _ = train_tokenizer([d.text for d in docs["train"]], flags["vocab"])
        if ep and not rank:
            dist.barrier()
        model_cfg = model_config(flags, tokenizer.get_vocab_size())
        settings = {"flags": {k: v for k, v in flags.items() if k not in RESUMABLE_FLAGS}, "model": model_cfg.to_dict(),
                    "data": {"source": str(data), "fingerprint": fingerprint,
                             "documents": {s: len(v) for s, v in docs.items()}}}
    train = TokenStream.from_documents(docs["train"], tokenizer, "training data")
    val = TokenStream.from_documents(docs["validation"], tokenizer, "validation data")
    torch.manual_seed(train_cfg.seed)  # every rank builds the same model
    model = GPT(model_cfg)
    if ep:
        expert_parallel(model)
    trainer = Trainer(model, train, val, train_cfg, out_dir=out, progress=not args.no_progress, name="train",
                      settings=settings, files={"tokenizer.json": tokenizer.to_str()} if not args.resume else None,
                      overwrite=args.overwrite)
    trainer.train(resume=args.resume)
    if ep:  # gather the experts under their global ids: the saved model loads at any parallel size

        state = full_state_dict(model)
        model = GPT(model_cfg)
        model.load_state_dict(state)
        if rank == 0:
            model.save(out / "model")
        dist.barrier()
    else:
        model.save(out / "model")
    last = [r for r in trainer.history if "val_ppl" in r]
    if last and rank == 0:
        print(f"step {trainer.step}: validation perplexity {last[-1]['val_ppl']:.2f}; model saved to {out / 'model'}")
    return model


__all__ = ["add_train_arguments", "model_config", "train_from_args"]


COMMAND = Command(
    help="train a GPT (dense or MoE) on the bundled corpus or your text",
    description="Train moekit.models.GPT with AdamW, warmup + cosine, MoE auxiliary losses, "
    "checkpoints and exact --resume.",
    add_arguments=add_train_arguments, run=train_from_args,
)
