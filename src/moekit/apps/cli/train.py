"""`moekit train`: the command-line front end of :class:`moekit.train.Trainer`.

A new run (``--out`` missing or empty) records every flag that defines it, the model config and a
fingerprint of the training text in the run folder's manifest. ``--resume`` rebuilds the run from
that record: a flag that conflicts with it is refused with the list of differences, except those
whose meaning on resume is well defined (more ``--steps``, another ``--lr``, ``--minutes``,
``--eval-every``, ``--ckpt-every``, ``--max-nonfinite``, ``--device``), which are applied and reported.

``--config run.toml`` gives any of these settings, and the ones no flag covers (every
:class:`~moekit.train.TrainConfig` field, the GPT's ``rope_theta``, ``norm_eps``, ``tie_embeddings``,
a router's ``router_args``), in a file (:mod:`moekit.apps.cli.run_config`); flags override it. The
run folder keeps the resolved settings as ``config.toml``, which ``--config`` takes back.
``--ffn mole`` trains Mixture-of-Lookup-Experts FFNs and writes their lookup table beside the model
(``mole_table``), from which ``moekit generate`` serves it.

Under ``torchrun --nproc-per-node W`` the run is data parallel over the ``W`` processes (NCCL on
CUDA, gloo on the CPU; ``--batch-size`` is the global batch, split between them); with
``--expert-parallel N`` the experts are sharded over ``N`` of them and each shard has ``W / N``
replicas. A run may be resumed at another layout or on another device.
"""

from __future__ import annotations

import argparse
import inspect
import os
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from moekit._checks import arg_number
from moekit.apps.cli.command import Command
from moekit.apps.cli.run_config import CONFIG_FILE, read_run_config, run_config_toml
from moekit.data import TokenStream, by_split, load_corpus, load_tokenizer, train_tokenizer
from moekit.data.corpus import corpus_fingerprint
from moekit.io import check_target, verify
from moekit.loader import TABLE_NAME
from moekit.models import GPT, GPTConfig
from moekit.models.mole import reparameterize
from moekit.models.mole.format import DTYPES, QUANTIZED
from moekit.parallel import (
    DEVICES,
    expert_groups,
    expert_parallel,
    full_state_dict,
    init_distributed,
    parallel_mesh,
    resolve_device,
)
from moekit.routers import available_routers, router_class
from moekit.train.trainer import RUN_KIND, TrainConfig, Trainer

FFN_KINDS = ("dense", "moe", "mole")
#: the lookup-table dtypes of ``--ffn mole``
TABLE_DTYPES = (*(str(v[0]).removeprefix("torch.") for v in DTYPES.values()), *QUANTIZED)
_GPT = GPTConfig()
_TRAIN = {f.name: f.default for f in fields(TrainConfig)}
#: settings that define a run, with their defaults (None in the parser: "not given"); the last ones
#: of each have no flag and come from ``--config``
MODEL_FLAGS = {"ffn": "dense", "experts": 8, "k": 2, "router": "topk", "vocab": 8192, "d_model": 128, "layers": 4,
               "heads": 4, "d_ff": 512, "table_dtype": "float16",
               "router_args": None, "rope_theta": _GPT.rope_theta, "norm_eps": _GPT.norm_eps,
               "tie_embeddings": _GPT.tie_embeddings}
TRAIN_FLAGS = {"steps": 1000, "minutes": None, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "warmup": 50,
               "eval_every": 100, "ckpt_every": 100, "seed": 0, "max_nonfinite": 3, "device": "auto",
               **{k: _TRAIN[k] for k in ("min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "eval_chunks",
                                         "log_every")}}
#: flags a resumed run may change (applied from the resumed step on)
RESUMABLE_FLAGS = ("steps", "minutes", "lr", "eval_every", "ckpt_every", "max_nonfinite", "device")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    pos_int, nonneg_int = arg_number(1, integer=True), arg_number(0, integer=True)
    p.add_argument("--data", default=None,
                   help="'wiki' (bundled corpus, the default), a text file, a folder, or JSONL with 'text'")
    p.add_argument("--out", required=True, help="run folder: tokenizer, checkpoints, metrics.jsonl, final model")
    p.add_argument("--config", default=None, metavar="TOML",
                   help="settings file: data, [model] and [train] tables (every TrainConfig field); flags override "
                        f"it; a run's resolved settings are in its {CONFIG_FILE}")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in --out although it holds one (its checkpoints go once the new run "
                        "has written its first)")
    m = p.add_argument_group("model")
    m.add_argument("--ffn", choices=FFN_KINDS, default=None,
                   help="FFN of every layer: dense SwiGLU, a mixture of experts, or mixture of lookup experts (MoLE, "
                        "served from a lookup table written beside the model) (default: dense)")
    m.add_argument("--experts", type=pos_int, default=None, help="experts per MoE or MoLE layer (default: 8)")
    m.add_argument("--k", type=pos_int, default=None, help="experts per token (MoE) (default: 2)")
    m.add_argument("--router", default=None, help=f"registered router name, one of {available_routers()} (default: topk)")
    m.add_argument("--vocab", type=arg_number(258, integer=True), default=None,
                   help="tokenizer vocabulary size (default: 8192)")
    m.add_argument("--d-model", type=pos_int, default=None, help="model width (default: 128)")
    m.add_argument("--layers", type=pos_int, default=None, help="transformer blocks (default: 4)")
    m.add_argument("--heads", type=pos_int, default=None, help="attention heads (default: 4)")
    m.add_argument("--d-ff", type=pos_int, default=None,
                   help="dense FFN width; MoE experts get d_ff / k; MoLE's shared FFN and experts d_ff (default: 512)")
    m.add_argument("--table-dtype", choices=TABLE_DTYPES, default=None,
                   help="--ffn mole: the lookup table's dtype (int8, nf4: quantized) (default: float16)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=pos_int, default=None, help="optimizer steps (default: 1000)")
    t.add_argument("--minutes", type=arg_number(0, lo_open=True), default=None, help="wall-clock budget in minutes: stop at the step that exceeds it (default: none)")
    t.add_argument("--batch-size", type=pos_int, default=None,
                   help="sequences per step, split between the processes of a torchrun launch (default: 16)")
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
    t.add_argument("--device", choices=DEVICES, default=None,
                   help="where to train: cuda (each torchrun process on its own GPU), cpu, or auto: cuda if there "
                   "is a GPU (default: auto)")
    t.add_argument("--expert-parallel", type=pos_int, default=None, metavar="N",
                   help="shard the experts over N processes, each shard replicated over W / N data-parallel "
                   "ones; launch with torchrun --nproc-per-node W -m moekit train --expert-parallel N ...")


def _launch(ep: int | None, device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group, if any (NCCL on CUDA, gloo on the CPU): ``(rank, world size)``."""
    if ep and "WORLD_SIZE" not in os.environ:
        raise SystemExit(f"--expert-parallel {ep}: launch with torchrun --nproc-per-node {ep} -m moekit train "
                         f"--expert-parallel {ep} ... (or a multiple of {ep} processes: data x expert parallel)")
    rank, world = init_distributed(device)
    if ep and world % ep:
        raise SystemExit(f"--expert-parallel {ep} but torchrun started {world} processes; give --nproc-per-node a "
                         f"multiple of {ep}")
    return rank, world


def _given(args: argparse.Namespace, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def model_config(flags: dict, vocab_size: int) -> GPTConfig:
    """The GPT config of a run's model flags (checked: a bad combination fails here, before any slow work)."""
    if flags["ffn"] not in FFN_KINDS:
        raise ValueError(f"ffn {flags['ffn']!r}: unknown; valid kinds are {list(FFN_KINDS)}")
    if flags["router"] not in available_routers():
        raise ValueError(f"--router {flags['router']!r}: unknown; valid names are {available_routers()}")
    if flags["ffn"] == "moe" and flags["k"] > flags["experts"]:
        raise ValueError(f"--k {flags['k']} must be <= --experts {flags['experts']}")
    cfg = GPTConfig(vocab_size=vocab_size, d_model=flags["d_model"], n_layers=flags["layers"], n_heads=flags["heads"],
                    max_seq_len=flags["seq_len"], d_ff=flags["d_ff"], rope_theta=flags["rope_theta"],
                    norm_eps=flags["norm_eps"], tie_embeddings=flags["tie_embeddings"])
    if flags["ffn"] == "moe":
        takes_k = "k" in inspect.signature(router_class(flags["router"])).parameters
        args = flags["router_args"] if flags["router_args"] is not None else {"k": flags["k"]} if takes_k else {}
        cfg = cfg.with_moe(flags["experts"], flags["k"], router=flags["router"], router_args=dict(args),
                           d_ff=max(1, flags["d_ff"] // flags["k"]))
    elif flags["ffn"] == "mole":
        cfg = replace(cfg, ffn=[{"kind": "mole", "num_experts": flags["experts"], "d_ff": flags["d_ff"]}] * cfg.n_layers)
    with torch.device("meta"):  # every layer and router built once, on no memory
        GPT(cfg)
    return cfg


def _train_config(flags: dict) -> TrainConfig:
    return TrainConfig(**{("warmup_steps" if k == "warmup" else k): v for k, v in flags.items()
                          if k in _TRAIN or k == "warmup"})


def _flag_types() -> dict[str, argparse.Action]:
    p = argparse.ArgumentParser(add_help=False)
    add_train_arguments(p)
    return {a.dest: a for a in p._actions}


def _from_file(args: argparse.Namespace) -> dict:
    """``--config``'s settings, each checked as its flag would check it."""
    if not args.config:
        return {}
    values = read_run_config(args.config)
    actions = _flag_types()
    for key, v in values.items():
        a = actions.get(key)
        if a is None:
            continue
        try:
            if a.type is not None:
                values[key] = a.type(str(v))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ValueError(f"--config {args.config}: {key} = {v!r}: {e}") from None
        if a.choices is not None and values[key] not in a.choices:
            raise ValueError(f"--config {args.config}: {key} = {v!r}: not one of {list(a.choices)}")
    return values


def _not_for(ffn: str) -> tuple[str, ...]:
    """The model settings that do not apply to FFNs of kind ``ffn``."""
    return (() if ffn == "moe" else ("router", "k", "router_args")) + (() if ffn == "mole" else ("table_dtype",))


def _settings_given(args: argparse.Namespace, ffn: str | None = None) -> dict:
    """The settings given for this launch: ``--config``'s, overridden by the flags given; those that
    do not apply to the FFN kind (``ffn``, or the one given) are refused."""
    given = {**_from_file(args), **_given(args, [*MODEL_FLAGS, *TRAIN_FLAGS, "data"])}
    ffn = ffn or given.get("ffn", MODEL_FLAGS["ffn"])
    extra = [f"--{k.replace('_', '-')}" for k in _not_for(ffn) if k in given]
    if extra:
        raise ValueError(f"{', '.join(extra)} do not apply to --ffn {ffn}; drop them")
    return given


def _resume_plan(args: argparse.Namespace, out: Path) -> tuple[TrainConfig, GPTConfig, dict]:
    """``(train config, model config, manifest)`` of the run in ``out`` with the flags given now
    applied; a flag that conflicts with the run is refused, listing every difference."""
    man = verify(out, RUN_KIND, "give the --out of a run moekit train started, or start a new run without --resume")
    settings = man.get("settings") or {}
    recorded = settings.get("flags")
    if not isinstance(recorded, dict) or "model" not in settings or not isinstance(man.get("config"), dict):
        raise ValueError(f"{out}: the run was not started by `moekit train` (no recorded flags); resume it from Python")
    given = _settings_given(args, (recorded or {}).get("ffn"))
    data = given.pop("data", None)
    conflicts = [f"--{k.replace('_', '-')} {v} (the run has {recorded.get(k, MODEL_FLAGS.get(k, TRAIN_FLAGS.get(k)))})"
                 for k, v in given.items() if k not in RESUMABLE_FLAGS
                 and v != recorded.get(k, MODEL_FLAGS.get(k, TRAIN_FLAGS.get(k)))]
    if data is not None and data != settings["data"]["source"]:
        conflicts.append(f"--data {data} (the run has {settings['data']['source']})")
    if conflicts:
        raise ValueError(f"--resume: {out} was started with other settings: {'; '.join(conflicts)}. Drop these flags "
                         "to continue the run, or start a new one with --overwrite")
    cfg = TrainConfig(**man["config"])
    changed = {k: v for k, v in given.items() if k in RESUMABLE_FLAGS and k in _TRAIN}
    cfg = replace(cfg, **changed)  # the Trainer reports them
    return cfg, GPTConfig.from_dict(settings["model"]), man


def train_from_args(args: argparse.Namespace) -> GPT:
    out = Path(args.out)
    ep = getattr(args, "expert_parallel", None)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: give one")
    if args.resume:
        train_cfg, model_cfg, man = _resume_plan(args, out)
        data = man["settings"]["data"]["source"]
        flags = {**MODEL_FLAGS, **TRAIN_FLAGS, **man["settings"]["flags"]}
    else:
        given = _settings_given(args)
        flags = {**MODEL_FLAGS, **TRAIN_FLAGS, **given}
        data = flags.pop("data", None) or "wiki"
        model_config(flags, flags["vocab"])  # names and shapes checked before the corpus and the tokenizer
        train_cfg = _train_config(flags)
        if check_target(out, RUN_KIND, "--out") and not args.overwrite:
            raise FileExistsError(f"--out {out}: holds a moekit training run; continue it with --resume or start a "
                                  "new one in its place with --overwrite")
    moe = flags["ffn"] == "moe"
    if ep and not moe:
        raise ValueError("--expert-parallel needs --ffn moe")
    device = resolve_device(train_cfg.device)  # one line where CUDA is asked for and absent, before any slow work
    rank, world = _launch(ep, device)
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
        if world > 1 and rank:  # rank 0 trains the tokenizer once; the others read it from the cache
            dist.barrier()
        tokenizer, _ = train_tokenizer([d.text for d in docs["train"]], flags["vocab"])
        if world > 1 and not rank:
            dist.barrier()
        model_cfg = model_config(flags, tokenizer.get_vocab_size())
        settings = {"flags": {k: v for k, v in flags.items() if k not in RESUMABLE_FLAGS}, "model": model_cfg.to_dict(),
                    "data": {"source": str(data), "fingerprint": fingerprint,
                             "documents": {s: len(v) for s, v in docs.items()}}}
        files = {"tokenizer.json": tokenizer.to_str(), CONFIG_FILE: run_config_toml(
            {"data": str(data), **{k: v for k, v in flags.items() if k not in _not_for(flags["ffn"])}})}
    train = TokenStream.from_documents(docs["train"], tokenizer, "training data")
    val = TokenStream.from_documents(docs["validation"], tokenizer, "validation data")
    torch.manual_seed(train_cfg.seed)  # every rank builds the same model
    model = GPT(model_cfg).to(device)
    if ep:  # W / ep data-parallel replicas of ep expert shards
        expert_parallel(model, mesh=parallel_mesh(ep, device))
    trainer = Trainer(model, train, val, train_cfg, out_dir=out, progress=not args.no_progress, name="train",
                      settings=settings, files=None if args.resume else files,
                      overwrite=args.overwrite)
    trainer.train(resume=args.resume)
    model = _save_model(model, model_cfg, out / "model", rank, world)
    last = [r for r in trainer.history if "val_ppl" in r]
    if last and rank == 0:
        print(f"step {trainer.step}: validation perplexity {last[-1]['val_ppl']:.2f}; model saved to {out / 'model'}")
    if flags["ffn"] == "mole" and rank == 0:
        dtype = flags["table_dtype"]
        reparameterize(model.cpu().eval(), out / TABLE_NAME, dtype=dtype if dtype in QUANTIZED else getattr(torch, dtype),
                       progress=not args.no_progress)
        print(f"MoLE lookup table ({dtype}) written to {out / TABLE_NAME}: moekit generate --model {out / 'model'} "
              "serves it")
    return model


def _save_model(model: GPT, cfg: GPTConfig, path: Path, rank: int, world: int) -> GPT:
    """Rank 0 saves the trained model to ``path``, its experts gathered under their global ids (so
    it loads at any layout); returns the model saved."""
    if expert_groups(model) is not None:
        state = full_state_dict(model)
        model = GPT(cfg)
        model.load_state_dict(state)
    if rank == 0:
        model.save(path)
    if world > 1:
        dist.barrier()
    return model


__all__ = ["add_train_arguments", "model_config", "train_from_args"]


COMMAND = Command(
    help="train a GPT (dense or MoE) on the bundled corpus or your text",
    description="Train moekit.models.GPT with AdamW, warmup + cosine, MoE auxiliary losses, "
    "checkpoints and exact --resume.",
    add_arguments=add_train_arguments, run=train_from_args,
)
