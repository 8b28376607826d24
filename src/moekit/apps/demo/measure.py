"""What the demo measures of one model besides its perplexity: training step time, prefill and
decode speed, and how evenly its experts are loaded."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from moekit.data import TokenStream
from moekit.models import GPT
from moekit.train import TrainConfig, Trainer


def step_time(model: GPT, data: TokenStream, cfg: TrainConfig, steps: int = 5) -> float:
    """Median seconds per training step of a throw-away model (after two warm-up steps)."""
    trainer = Trainer(model, data, None, replace(cfg, steps=steps + 2), progress=False)
    trainer.train_step()
    trainer.train_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_speed(model: GPT, vocab: int, seq_len: int, repeats: int = 3) -> dict:
    """Prefill tokens/s (batch 8 x seq_len) and decode tokens/s (batch 1, greedy, KV cache)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (8, seq_len), generator=g)
    pre = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model(prompt)
        pre.append(time.perf_counter() - t0)
    new = max(8, seq_len // 2)
    start = torch.randint(1, vocab, (1, seq_len - new), generator=g)
    dec = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.generate(start, new)
        dec.append(time.perf_counter() - t0)
    return {"prefill_tok_s": prompt.numel() / statistics.median(pre[1:]),
            "decode_tok_s": new / statistics.median(dec[1:])}


def load_balance(loads: dict[str, dict]) -> float | None:
    """Mean over MoE layers of max/mean assignments per expert (1.0 = perfectly balanced)."""
    vals = []
    for d in loads.values():
        per_expert = torch.tensor(d["counts"], dtype=torch.float64).sum(0)
        if per_expert.sum() > 0:
            vals.append(float(per_expert.max() / per_expert.mean()))
    return statistics.mean(vals) if vals else None
