"""`moekit train`: the command-line front end of :class:`moekit.train.Trainer`."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from ..data import TokenStream, by_split, load_corpus, load_tokenizer, train_tokenizer
from ..io import atomic_write_text
from ..models import GPT, GPTConfig
from ..models.gpt import read_config
from .trainer import TrainConfig, Trainer


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wiki", help="'wiki' (bundled corpus), a text file, a folder, or JSONL with 'text'")
    p.add_argument("--out", required=True, help="run folder: tokenizer, checkpoints, metrics.jsonl, final model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    m = p.add_argument_group("model")
    m.add_argument("--ffn", choices=["dense", "moe"], default="dense")
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--k", type=int, default=2, help="experts per token (MoE)")
    m.add_argument("--router", default="topk", help="registered router name")
    m.add_argument("--vocab", type=int, default=8192)
    m.add_argument("--d-model", type=int, default=128)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--d-ff", type=int, default=512, help="dense FFN width (MoE experts get d_ff / k)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--ckpt-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--expert-parallel", type=int, default=None, metavar="N",
                   help="shard the experts over N processes (data + expert parallel); launch with "
                   "torchrun --nproc-per-node N -m moekit train --expert-parallel N ...")


def _init_expert_parallel(n: int) -> int:
    """Join the torchrun process group (gloo on CPU, NCCL on GPU); returns this process's rank."""
    import os

    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        raise SystemExit(f"--expert-parallel {n}: launch with torchrun --nproc-per-node {n} -m moekit train "
                         f"--expert-parallel {n} ...")
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # the trainer runs on the CPU
    if dist.get_world_size() != n:
        raise SystemExit(f"--expert-parallel {n} but torchrun started {dist.get_world_size()} processes; give "
                         "--nproc-per-node the same number")
    return dist.get_rank()


def train_from_args(args: argparse.Namespace) -> GPT:
    import torch
    import torch.distributed as dist

    out = Path(args.out)
    ep = getattr(args, "expert_parallel", None)
    rank = _init_expert_parallel(ep) if ep else 0
    if ep and args.ffn != "moe":
        raise SystemExit("--expert-parallel needs --ffn moe")
    docs = by_split(load_corpus(args.data))
    if not docs["validation"]:
        raise ValueError(f"--data {args.data}: no validation documents; give more text")
    if args.resume:
        tokenizer = load_tokenizer(out / "tokenizer.json")
        model_cfg = read_config(out / "run")
        train_cfg = TrainConfig(**json.loads((out / "run" / "train_config.json").read_text()))
        if tokenizer.get_vocab_size() != model_cfg.vocab_size:
            raise ValueError(
                f"{out}/tokenizer.json has {tokenizer.get_vocab_size()} tokens but the checkpoint's model has "
                f"vocab_size={model_cfg.vocab_size}; resume with the tokenizer the run was started with"
            )
    else:
        if ep and rank:  # rank 0 trains the tokenizer once; the others read it from the cache
            dist.barrier()
        tokenizer, _ = train_tokenizer([d.text for d in docs["train"]], args.vocab)
        if ep and not rank:
            dist.barrier()
        if rank == 0:
            atomic_write_text(out / "tokenizer.json", tokenizer.to_str())
        model_cfg = GPTConfig(vocab_size=tokenizer.get_vocab_size(), d_model=args.d_model, n_layers=args.layers,
                              n_heads=args.heads, max_seq_len=args.seq_len, d_ff=args.d_ff)
        if args.ffn == "moe":
            model_cfg = model_cfg.with_moe(args.experts, args.k, router=args.router)
        train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                warmup_steps=args.warmup, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
                                minutes=args.minutes, seed=args.seed)
        run = out / "run"
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run / "config.json", json.dumps(model_cfg.to_dict(), indent=2))
            atomic_write_text(run / "train_config.json",
                              json.dumps({f.name: getattr(train_cfg, f.name) for f in fields(train_cfg)}, indent=2))
    train = TokenStream.from_documents(docs["train"], tokenizer, "training data")
    val = TokenStream.from_documents(docs["validation"], tokenizer, "validation data")
    torch.manual_seed(args.seed)  # every rank builds the same model
    model = GPT(model_cfg)
    if ep:
        from ..parallel import expert_parallel

        expert_parallel(model)
    trainer = Trainer(model, train, val, train_cfg, out_dir=out, progress=not args.no_progress, name="train")
    trainer.train(resume=args.resume)
    if ep:  # gather the experts under their global ids: the saved model loads at any parallel size
        from ..parallel import full_state_dict

        state = full_state_dict(model)
        model = GPT(model_cfg)
        model.load_state_dict(state)
        if rank == 0:
            model.save(out / "model")
        dist.barrier()
        dist.destroy_process_group()
    else:
        model.save(out / "model")
    last = [r for r in trainer.history if "val_ppl" in r]
    if last and rank == 0:
        print(f"step {trainer.step}: validation perplexity {last[-1]['val_ppl']:.2f}; model saved to {out / 'model'}")
    return model
