"""The model served for real from an on-disk store through the expert cache (reads bypass the page
cache), decoding held-out tokens: its counters must equal the simulator's on the same stream, its
logits the in-memory model's; tokens/s, the time spent loading, perplexity with int8 copies
(HOBBIT) and the peak RSS of each configuration are measured."""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from moekit.apps.bench.offload.simulate import BUDGETS
from moekit.apps.bench.timing import peak_rss_mb, rss_mb
from moekit.models import GPT
from moekit.offload import Future, Trace, load_offloaded, offload, simulate

#: served configurations at 50%: (label, policy, partition, window, prefetch, direct rule)
SERVED = (
    ("LRU, per layer", "lru", "layer", math.inf, None, None),
    ("LRU, per layer + next-layer-gate prefetch", "lru", "layer", math.inf, "gate", None),
    ("LRU + Fiddler's rule (compute misses from the store)", "lru", "layer", math.inf, None, 2),
    ("Belady, lookahead = this token (PreGate decode)", "belady", "layer", 1, None, None),
    ("Belady, lookahead = this token + exact prefetch", "belady", "layer", 1, "future", None),
    ("Belady, lookahead 16 tokens", "belady", "layer", 16, None, None),
    ("Belady, lookahead 16 tokens + bypass to the store", "belady", "layer", 16, None, "future"),
    ("Belady-MIN + exact prefetch", "belady", "layer", math.inf, "future", None),
)
#: every expert held in host RAM, the cache a second copy in the same memory: (label, direct rule)
HOST_RAM = (("LRU, load on miss", None), ("LRU + Fiddler's rule, threshold measured at start-up", "cost"))
LOW_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)  # top-2 weights are renormalised: < 0.5 is the second expert of every token


def decode_steps(model: GPT, seq: torch.Tensor) -> Iterator[torch.Tensor]:
    """The logits of decoding ``seq`` (teacher-forced) one token at a time with a KV cache, step by step."""
    caches = [{} for _ in model.blocks]
    for t in range(seq.shape[1]):
        yield model(seq[:, t: t + 1], caches)


def decode(model: GPT, seq: torch.Tensor) -> torch.Tensor:
    """The logits of :func:`decode_steps`, concatenated along the sequence."""
    return torch.cat(list(decode_steps(model, seq)), 1)


@torch.no_grad()
def decode_tok_s(model: GPT, seq: torch.Tensor) -> float:
    """Tokens per second of decoding ``seq`` token by token."""
    t0 = time.perf_counter()
    for _ in decode_steps(model, seq):
        pass
    return seq.shape[1] / (time.perf_counter() - t0)


@torch.no_grad()
def serve_check(model: GPT, store, seq: torch.Tensor, trace: Trace, budget: float, label: str, policy: str,
                partition: str, window: float, prefetch: str | None = None, direct: str | int | None = None,
                host: str = "disk") -> dict:
    """Decode ``seq`` token by token with the experts served from ``store``; counters against the
    simulator on the same stream (but for the predicted prefetch), logits against the in-memory model."""
    served = copy.deepcopy(model)
    acc, tokens = trace.accesses(), trace.token.tolist()
    future = Future(acc, tokens) if policy == "belady" or prefetch == "future" or direct == "future" else None
    server = offload(served, store, budget=budget, policy=policy, partition=partition, window=window, future=future,
                     prefetch=prefetch, direct=direct, host=host)
    t0 = time.perf_counter()
    logits = decode(served, seq)
    secs = time.perf_counter() - t0
    st = server.stats()
    server.close()
    row = {"budget": budget, "policy": label, "prefetch": prefetch, "direct_rule": direct, "host": host,
           "costs": server.costs, "tokens": st.tokens,
           "tok_s": st.tokens / secs,
           **{k: v for k, v in st.as_dict().items() if k != "tokens"},
           "exposed_share": st.exposed_s / secs, "max_abs_logit_diff": float((logits - model(seq)).abs().max())}
    if prefetch != "gate":
        sim = simulate(acc, server.expert_bytes, trace.num_experts, server.budget_bytes, policy, partition, window,
                       tokens, prefetch=prefetch == "future", direct=server.cache.direct)
        row["matches_simulator"] = (st.hits, st.misses, st.prefetched, st.direct, st.bytes_loaded) == (
            sim.hits, sim.misses, sim.prefetched, sim.direct, sim.bytes_loaded)
    return row


@torch.no_grad()
def mixed_precision_check(model: GPT, store, seqs: torch.Tensor, budget: float, threshold: float | None) -> dict:
    """HOBBIT at ``budget`` (LRU per layer): decode ``seqs`` with misses below ``threshold`` served by
    int8 copies; next-token perplexity against the in-memory model's on the same tokens."""
    served = copy.deepcopy(model)
    server = offload(served, store, budget=budget, policy="lru", low_threshold=threshold)
    nll = ref_nll = 0.0
    worst = 0.0
    for seq in seqs:
        seq = seq.unsqueeze(0)
        logits = decode(served, seq)
        want = model(seq)
        nll += float(F.cross_entropy(logits[0, :-1], seq[0, 1:], reduction="sum"))
        ref_nll += float(F.cross_entropy(want[0, :-1], seq[0, 1:], reduction="sum"))
        worst = max(worst, float((logits - want).abs().max()))
    n = seqs.shape[0] * (seqs.shape[1] - 1)
    st = server.stats()
    server.close()
    return {"budget": budget, "low_threshold": threshold, "tokens": st.tokens, "ppl": math.exp(nll / n),
            "ppl_in_memory": math.exp(ref_nll / n), "max_abs_logit_diff": worst,
            "low_bit_share": st.low_bit / st.accesses, "bytes_per_token": st.bytes_per_token, "hit_rate": st.hit_rate}


def _memory_run(model_dir: str, store: str | None, budget: float | None, ids: list[int]) -> dict:
    """Peak RSS of decoding ``ids`` (teacher-forced) alone in this process: the model in memory
    (``budget=None``) or served through a cache of ``budget``, its experts never loaded."""
    start = rss_mb()
    with torch.no_grad():
        if budget is None:
            model, server = GPT.load(model_dir).eval(), None
        else:
            model, server = load_offloaded(model_dir, store, budget)
        for _ in decode_steps(model, torch.tensor([ids])):
            pass
    peak = peak_rss_mb()
    out = {"budget": budget, "peak_rss_mb": peak, "rss_at_start_mb": start, "model_rss_mb": peak - start}
    if server is not None:
        out["resident_expert_bytes"] = server.resident_bytes()
        server.close()
    return out


def memory_runs(model_dir: str, store: str, ids: list[int], budgets=BUDGETS) -> list[dict]:
    """One spawned process per configuration, so each peak RSS is that configuration's alone."""
    ctx = mp.get_context("spawn")
    out = []
    for budget in (None, *budgets):
        with ctx.Pool(1) as pool:
            out.append(pool.apply(_memory_run, (model_dir, store, budget, ids)))
    return out


def hidden_vs_demand(served: list[dict]) -> list[float | None]:
    """For each served row with prefetch: the share of its reads' cost that the forward did not wait
    for, against what the same bytes cost as demand reads in the run without prefetch (the first
    row): ``1 - exposed / (bytes x demand seconds per byte)``. Unlike the reader thread's own time,
    this charges prefetching for the reads it slows down."""
    base = next(x for x in served if not x["prefetch"])
    per_byte = base["read_s"] / max(base["bytes_loaded"], 1)
    return [None if not x["prefetch"] else 1 - x["exposed_s"] / max(x["bytes_loaded"] * per_byte, 1e-12) for x in served]
