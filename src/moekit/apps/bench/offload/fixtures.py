"""The models the offload benchmark measures, trained and saved on first use.

- :func:`demo_moe`: the demo's top-2 MoE (``runs/demo/variants/moe-top2/model`` after ``make demo``),
  or else one trained with the demo's settings and token count (357 steps of 16 x 128) and kept in
  ``runs/bench/moe-top2``.
- :func:`readme_model`: the demo's dense GPT refactored by Read-ME into one expert per topic.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from moekit.apps.presets import FULL, QUICK, base_config, default_variants, prepare_corpus
from moekit.convert import refactor, tune
from moekit.models import GPT
from moekit.train import TrainConfig, Trainer

DEFAULT_MODEL = "runs/demo/variants/moe-top2/model"  # written by `make demo`
READ_ME_MODEL = "runs/bench/readme-topics"  # the demo's dense GPT refactored by Read-ME, one expert per topic
TRAINED_HERE = "runs/bench/moe-top2"  # where the bench trains one with the demo's settings otherwise


def resolve_model(path: str | os.PathLike | None, quick: bool = False) -> Path:
    """``path``, else the demo's trained moe-top2, else where the bench trains one."""
    if path is not None:
        return Path(path)
    if quick:
        return Path(TRAINED_HERE + "-quick")
    return Path(DEFAULT_MODEL if (Path(DEFAULT_MODEL) / "config.json").exists() else TRAINED_HERE)


def _train(model: GPT, train, settings, steps: int, console, name: str) -> None:
    """Train ``model`` for ``steps`` steps on ``train`` with the demo's ``settings`` (seeded by the caller)."""
    cfg = TrainConfig(steps=steps, batch_size=settings.batch_size, seq_len=settings.seq_len, lr=settings.lr,
                      warmup_steps=max(1, steps // 20), log_every=25)
    Trainer(model, train, None, cfg, progress=console is not None, name=name).train()


def demo_moe(path: str | os.PathLike | None = None, steps: int = 357, console=None, quick: bool = False
             ) -> tuple[GPT, object]:
    """``(model, validation stream)``: the trained top-2 MoE at ``path`` (default: the demo's, else
    ``runs/bench/moe-top2``), trained with the demo's settings for ``steps`` steps and saved there
    if it is missing (``quick``: the quick demo's smaller settings)."""
    path = resolve_model(path, quick)
    s = QUICK if quick else FULL
    train, val, tok = prepare_corpus(s, console=console)
    if (path / "config.json").exists():
        model = GPT.load(path).eval()
        if model.config.vocab_size != tok.get_vocab_size():
            raise ValueError(f"{path}: vocabulary of {model.config.vocab_size} tokens, the {'quick ' if quick else ''}"
                             f"demo's tokenizer has {tok.get_vocab_size()}; pass --model of a model trained by "
                             f"`moekit demo{' --quick' if quick else ''}`")
        return model, val
    if console is not None:
        console.print(f"{path}: no trained model; training the demo's moe-top2 for {steps} steps (demo settings)")
    variant = next(v for v in default_variants(base_config(s, tok.get_vocab_size())) if v.name == "moe-top2")
    torch.manual_seed(0)
    model = GPT(variant.config)
    _train(model, train, s, steps, console, "moe-top2")
    model.save(path, files={"tokenizer.json": tok.to_str()})  # the tokenizer for moekit generate
    return model.eval(), val


def topic_domains(train, topics: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The ``topics`` largest topics of the training documents (but "Uncategorized"), each up to 32
    sequences of ``seq_len`` tokens of its documents: Read-ME's refactoring domains."""
    names = [t for t, _ in Counter(d.topic_en for d in train.docs).most_common() if t != "Uncategorized"][:topics]
    doc_topic = [d.topic_en for d in train.docs]
    domains = {}
    for t in names:
        keep = torch.tensor([x == t for x in doc_topic])[train.doc.long()]
        ids = train.ids[keep]
        n = min(32, ids.numel() // seq_len)
        domains[t] = ids[: n * seq_len].view(n, seq_len)
    return domains


def readme_model(path: str | os.PathLike = READ_ME_MODEL, steps: int = 357, topics: int = 8, console=None
                 ) -> tuple[GPT, object]:
    """``(model, validation stream)``: the demo's dense GPT (its settings, ``steps`` steps) refactored
    by Read-ME into one expert per topic of the corpus's ``topics`` largest (a residual expert always
    on, a PreGate routing every layer), tuned in two alternating rounds; built and saved at ``path``
    if missing."""
    path = Path(path)
    train, val, tok = prepare_corpus(FULL, console=console)
    if (path / "config.json").exists():
        return GPT.load(path).eval(), val
    if console is not None:
        console.print(f"{path}: building the Read-ME model (dense GPT, {steps} steps; refactor by topic; tuning)")
    torch.manual_seed(0)
    dense = GPT(base_config(FULL, tok.get_vocab_size()))
    _train(dense, train, FULL, steps, console, "dense")
    domains = topic_domains(train, topics, FULL.seq_len)
    model = refactor(dense, domains, keep=0.5, pregate={"d_model": 64, "n_heads": 4}, progress=console is not None)
    tune(model, lambda step: train.batch(step, FULL.batch_size, FULL.seq_len, 7), rounds=2, router_steps=30,
         expert_steps=60, router_lr=5e-3, expert_lr=3e-4, progress=console is not None)
    model.save(path, files={"tokenizer.json": tok.to_str()})
    return model.eval(), val
