"""Cache policies on recorded routing traces, in the simulator: the policy x budget grid on the
demo model's trace, and the Read-ME study (Table 4's hit rates, locality, expert-aware batching).
Hits, loads and bytes per token are exact counters, so they do not depend on the machine."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from moekit.apps.bench.offload.fixtures import READ_ME_MODEL
from moekit.models import GPT
from moekit.offload import Trace, available_policies, compare_batching, record_trace, simulate

BUDGETS = (0.25, 0.5, 0.75)
#: (label, policy, partition, lookahead window in tokens, direct rule)
POLICIES = (
    ("LRU, one global pool", "lru", "global", math.inf, None),
    ("LRU, per layer", "lru", "layer", math.inf, None),
    ("LFU, per layer", "lfu", "layer", math.inf, None),
    ("LRU + Fiddler's rule (compute misses from the store)", "lru", "layer", math.inf, 2),
    ("Belady, lookahead = this token (PreGate decode)", "belady", "layer", 1, None),
    ("Belady, lookahead 16 tokens", "belady", "layer", 16, None),
    ("Belady, lookahead 16 tokens + bypass to the store", "belady", "layer", 16, "future"),
    ("Belady-MIN, per layer (offline optimum)", "belady", "layer", math.inf, None),
    ("Belady-MIN + bypass to the store", "belady", "layer", math.inf, "future"),
    ("Belady-MIN, one global pool", "belady", "global", math.inf, None),
)
BATCH_SIZES = (4, 8)
MIN_LABEL = "Belady-MIN, per layer (offline optimum)"
#: the Read-ME study's policies: (label, policy, lookahead window in tokens)
READ_ME_POLICIES = (("LRU", "lru", math.inf), ("LFU", "lfu", math.inf), ("Belady, lookahead 16 tokens", "belady", 16),
                    ("Belady-MIN", "belady", math.inf))


def check_policies(rows: Iterable[Sequence]) -> None:
    """Raise ``ValueError`` unless every ``(label, policy, ...)`` row names a registered cache policy."""
    known = available_policies()
    for label, policy, *_ in rows:
        if policy not in known:
            raise ValueError(f"bench offload: {label!r} uses the cache policy {policy!r}, which is not registered "
                             f"(registered: {', '.join(known)})")


def split_requests(per_token: list, seq_len: int) -> list[list]:
    """A trace's per-token routing cut into its whole sequences: the concurrent requests."""
    return [per_token[i * seq_len:(i + 1) * seq_len] for i in range(len(per_token) // seq_len)]


def _grid_row(trace: Trace, budget: float, spec: tuple, s, best: int) -> dict:
    """One simulated policy at one budget; ``best``: Belady-MIN's misses at that budget."""
    label, policy, partition, window, direct = spec
    return {"budget": budget, "policy": label, "kind": policy, "partition": partition,
            "window": None if math.isinf(window) else window, "direct_rule": direct, "hit_rate": s.hit_rate,
            "direct_share": s.direct / max(s.misses, 1),
            "loads_per_token": s.misses / trace.num_tokens, "bytes_per_token": s.bytes_loaded / trace.num_tokens,
            "vs_min": s.misses / best if best else math.nan,
            "hit_rate_by_layer": [s.hits_by_layer.get(i, 0) / max(s.accesses_by_layer.get(i, 0), 1)
                                  for i in range(trace.num_layers)]}


def simulate_grid(trace: Trace, expert_bytes: list[int], budgets=BUDGETS, policies=POLICIES,
                  progress: Callable[[], None] | None = None) -> list[dict]:
    """Every policy at every budget (a share of all experts' bytes) on one trace; ``vs_min`` = loads /
    Belady-MIN's (per layer), so ``policies`` must include :data:`MIN_LABEL`."""
    check_policies(policies)
    acc, tokens = trace.accesses(), trace.token.tolist()
    total = sum(b * n for b, n in zip(expert_bytes, trace.num_experts))
    rows = []
    for budget in budgets:
        found = []
        for _, policy, partition, window, direct in policies:
            found.append(simulate(acc, expert_bytes, trace.num_experts, int(budget * total), policy, partition, window,
                                  tokens, direct=direct))
            if progress is not None:
                progress()
        best = found[[p[0] for p in policies].index(MIN_LABEL)].misses
        rows += [_grid_row(trace, budget, spec, s, best) for spec, s in zip(policies, found)]
    return rows


def readme_study(model: GPT, val, sequences: int = 32) -> dict:
    """The Read-ME serving claims on a Read-ME model: hit rate of each policy at 2..5 expert slots
    per layer (Table 4), temporal locality, and expert-aware batching of pre-gated requests."""
    seq_len = model.config.max_seq_len
    ids, _, _ = val.chunks(seq_len, sequences)
    trace = record_trace(model, ids, meta={"model": READ_ME_MODEL, "seq_len": seq_len})
    E, L = trace.num_experts[0], trace.num_layers
    acc, tokens = trace.accesses(), trace.token.tolist()
    ebytes = [1] * L
    table = [{"capacity": cap, **{label: simulate(acc, ebytes, trace.num_experts, cap * L, policy, "layer", window,
                                                  tokens).hit_rate for label, policy, window in READ_ME_POLICIES}}
             for cap in range(1, E)]
    per_token = trace.per_token()
    first = [t[0][0] for t in per_token]
    same = sum(a == b for i, (a, b) in enumerate(zip(first, first[1:])) if (i + 1) % seq_len)
    requests = split_requests(per_token, seq_len)
    return {"num_experts": E, "layers": L, "tokens": trace.num_tokens, "requests": len(requests), "hit_rates": table,
            "temporal_locality": same / (trace.num_tokens - len(requests)),
            "expert_share": [first.count(e) / len(first) for e in range(E)],
            "batching": {str(b): compare_batching(requests, b) for b in (8, 16)}}


def batching_study(trace: Trace, batch_sizes: Sequence[int] = BATCH_SIZES) -> dict[str, dict]:
    """Read-ME's expert-aware batching against first come, first served, the trace's sequences
    taken as concurrent requests, at each batch size (keyed by its string)."""
    requests = split_requests(trace.per_token(), trace.meta["seq_len"])
    return {str(b): compare_batching(requests, b) for b in batch_sizes}
