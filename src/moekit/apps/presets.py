"""The settings the demo, the benchmarks and the LM experiments share: model and corpus presets
(``FULL`` for ``moekit demo``, ``QUICK`` for ``--quick`` and tests), the corpus preparation, and the
variants the demo compares."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from moekit.compress import compress, dedup_bytes, mcmoe
from moekit.data import TokenStream, by_split, load_corpus, train_tokenizer
from moekit.models import GPT, GPTConfig
from moekit.models.mole import reparameterize


@dataclass
class Variant:
    name: str
    config: GPTConfig
    description: str
    #: turns the trained model into the one that is served (e.g. MoLE's lookup tables), given a folder
    serve: Callable[[GPT, Path], GPT] | None = None
    #: extra measurements of the trained model: (model, folder, ppl, calibration batches of training
    #: windows) -> results; ``ppl(model, windows=None)`` is the validation perplexity (on the demo's
    #: evaluation windows, or on ``windows`` evenly spread ones)
    measure: Callable[[GPT, Path, Callable[..., float], list[Tensor]], dict] | None = None


def _serve_mole(model: GPT, folder: Path) -> GPT:
    return reparameterize(model, folder / "mole_table", dtype=torch.float16, progress=False)


def _mole_tables(model: GPT, folder: Path, ppl: Callable[..., float], calibration: list[Tensor]) -> dict:
    """Validation perplexity and size of MoLE's table in fp16 and post-training quantized."""
    out = {}
    for kind in (torch.float16, "int8", "nf4"):
        served = reparameterize(model, folder / f"mole_table_{str(kind).removeprefix('torch.')}", dtype=kind,
                                progress=False)
        table = served.blocks[0].ffn.table
        out[table.kind] = {"val_ppl": ppl(served), "mb": table.manifest["bytes"] / 2**20,
                           "bytes_per_token": table.bytes_per_token}
    return {"mole_tables": out}


#: the compressions of the demo's top-2 MoE: label -> (registered method, settings)
COMPRESSIONS = {"reap, E'=4": ("reap", {"num_experts": 4}), "hc-smoe, E'=4": ("hc-smoe", {"num_experts": 4}),
                "mc-moe, 2.5 bits": ("mc-moe", {"bits": 2.5})}
#: validation windows the compressed models are compared on (a few seconds each on a CPU)
COMPRESSION_EVAL_WINDOWS = 64


def compressions(model: GPT, folder: Path, ppl: Callable[..., float], calibration: list[Tensor]) -> dict:
    """Validation perplexity (on :data:`COMPRESSION_EVAL_WINDOWS` windows) and deduplicated size of the
    trained model and of copies compressed by each of :data:`COMPRESSIONS` from the ``calibration``
    batches (the model itself is unchanged)."""
    n = COMPRESSION_EVAL_WINDOWS
    out = {"uncompressed": {"val_ppl": ppl(model, n), "mb": dedup_bytes(model) / 2**20}}
    for label, (method, settings) in COMPRESSIONS.items():
        small = copy.deepcopy(model)
        if method == "mc-moe":
            mcmoe(small, calibration, **settings)
        else:
            compress(small, method, calibration, **settings)
        out[label] = {"val_ppl": ppl(small, n), "mb": dedup_bytes(small) / 2**20}
    return {"compressed": out}


@dataclass
class DemoSettings:
    minutes: float  # training budget for all variants together
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    seq_len: int
    batch_size: int
    lr: float
    max_train_docs: int | None
    eval_chunks: int | None  # final evaluation windows (None: the whole validation split)
    curve_points: int  # validation points on the loss curves


FULL = DemoSettings(minutes=5.0, vocab_size=4096, d_model=128, n_layers=4, n_heads=4, d_ff=512, seq_len=128,
                    batch_size=16, lr=3e-3, max_train_docs=None, eval_chunks=None, curve_points=6)
QUICK = DemoSettings(minutes=0.25, vocab_size=1024, d_model=64, n_layers=2, n_heads=2, d_ff=256, seq_len=64,
                     batch_size=8, lr=3e-3, max_train_docs=1500, eval_chunks=48, curve_points=2)


def default_variants(base: GPTConfig) -> list[Variant]:
    """The variants the demo compares (each method adds its own here)."""
    return [
        Variant("dense", base, f"dense SwiGLU FFN, d_ff={base.d_ff}"),
        Variant("moe-top2", base.with_moe(num_experts=8, k=2),
                f"top-2 of 8 SwiGLU experts of d_ff={base.d_ff // 2} (TopK, balance 0.01, z-loss 0.001)",
                measure=compressions),
        Variant("mole", replace(base, ffn=[{"kind": "mole", "num_experts": 4, "d_ff": base.d_ff}] * base.n_layers),
                f"MoLE: the dense SwiGLU FFN as shared expert + 4 GELU experts of d_ff={base.d_ff} on the token "
                "embedding, served from an fp16 lookup table on disk (inference computes no expert)",
                serve=_serve_mole, measure=_mole_tables),
    ]


def prepare_corpus(s: DemoSettings, data: str | None = None, console=None):
    """Training and validation token streams and the tokenizer (trained once, then cached)."""
    splits = by_split(load_corpus(data))
    train_docs = splits["train"]
    if s.max_train_docs and len(train_docs) > s.max_train_docs:  # an even sample across languages and topics
        train_docs = train_docs[:: math.ceil(len(train_docs) / s.max_train_docs)]
    val_docs = splits["validation"]
    if not val_docs:
        raise ValueError("the corpus has no validation documents; give more text")
    tokenizer, hit = train_tokenizer([d.text for d in train_docs], s.vocab_size)
    train = TokenStream.from_documents(train_docs, tokenizer, "training data")
    val = TokenStream.from_documents(val_docs, tokenizer, "validation data")
    if console is not None:
        console.print(f"corpus: {len(train_docs):,} training documents ({len(train):,} tokens), "
                      f"{len(val_docs):,} validation ({len(val):,} tokens); tokenizer {s.vocab_size} "
                      f"({'cached' if hit else 'trained'})")
    return train, val, tokenizer


def base_config(s: DemoSettings, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                     max_seq_len=s.seq_len, d_ff=s.d_ff)
