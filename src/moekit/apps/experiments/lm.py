"""What the language-model experiments share: the demo's corpus, model size and batches, one GPT
trained and evaluated, and its experts counted per token."""

from __future__ import annotations

import torch

from moekit.apps.presets import FULL, QUICK, DemoSettings, base_config, prepare_corpus
from moekit.layer import MoE
from moekit.models import GPT, GPTConfig
from moekit.train import TrainConfig, Trainer, evaluate


def settings(quick: bool) -> tuple[DemoSettings, int]:
    """Model/data settings and the number of training steps per run."""
    return (QUICK, 40) if quick else (FULL, 200)


def corpus(quick: bool, console=None):
    s, _ = settings(quick)
    return prepare_corpus(s, None, console)


def setup(quick: bool, console=None):
    """``(settings, steps, train, val, base config, evaluation windows)`` of an LM experiment."""
    s, steps = settings(quick)
    train, val, tok = prepare_corpus(s, None, console)
    return s, steps, train, val, base_config(s, tok.get_vocab_size()), 64 if quick else 256


def train_lm(config: GPTConfig, train, val, s: DemoSettings, steps: int, seed: int, eval_chunks: int | None,
             progress: bool = True, name: str = "train"):
    """Train one GPT on the demo's batches; return the model, its history and a full evaluation."""
    torch.manual_seed(seed)
    model = GPT(config)
    cfg = TrainConfig(steps=steps, batch_size=s.batch_size, seq_len=s.seq_len, lr=s.lr, seed=seed,
                      warmup_steps=max(1, steps // 20), log_every=5)
    trainer = Trainer(model, train, None, cfg, progress=progress, name=name)
    history = trainer.train()
    ev = evaluate(model, val, s.seq_len, 32, eval_chunks)
    return model, history, ev


@torch.no_grad()
def experts_per_token(model: GPT, val, s: DemoSettings, chunks: int = 64) -> list[dict]:
    """Per MoE layer on validation windows: mean experts with a non-zero weight per token, and how
    many experts were never used."""
    model.eval()
    x, _, _ = val.chunks(s.seq_len, chunks)
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    used = {name: torch.zeros(m.num_experts, dtype=torch.long) for name, m in moes}
    assigned = dict.fromkeys(used, 0)
    tokens = 0
    for i in range(0, x.shape[0], 32):
        model(x[i : i + 32])
        tokens += x[i : i + 32].numel()
        for name, m in moes:
            r = m.last_routing
            nz = r.weight != 0
            used[name] += torch.bincount(r.expert[nz], minlength=m.num_experts)
            assigned[name] += int(nz.sum())
    return [{"layer": name, "mean_experts": assigned[name] / tokens,
             "dead_experts": int((used[name] == 0).sum())} for name, _ in moes]


def with_router(base: GPTConfig, num_experts: int, d_ff: int, router: str, router_args: dict) -> GPTConfig:
    return base.with_moe(num_experts=num_experts, d_ff=d_ff, router=router, router_args=router_args)


__all__ = ["settings", "setup", "corpus", "train_lm", "experts_per_token", "with_router"]
