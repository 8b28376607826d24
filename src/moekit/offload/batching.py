"""Expert-aware batching (Read-ME, Algorithm 1): group concurrent requests' tokens by expert.

With pre-gated routing (a PreGate decides every layer's experts from the token ids before the
backbone runs) the scheduler knows which experts each pending token needs. Read-ME keeps one FIFO
per expert and fills a batch from the expert with the most pending tokens first, so each batch
touches few experts (fewer loads, fewer expert kernels); first-come batching mixes them.

:func:`build_batch` is Algorithm 1 as printed, with the pseudo-code's ``k``/``E`` typo fixed;
:func:`compare_batching` replays concurrent requests decoding in lock step and counts the unique
experts per batch and layer under both schedulers. The queue key is a token's first expert at one
layer (Read-ME routes one expert per token); which layer keys the queues is ours to choose.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from statistics import mean

__all__ = ["build_batch", "compare_batching", "fcfs_batches", "expert_aware_batches"]


def build_batch(queues: dict[int, deque], max_tokens: int) -> list:
    """One batch of at most ``max_tokens`` items, taken from the longest queue first (Algorithm 1):
    a queue that fits is taken whole and emptied, else its first items fill the batch and it stops."""
    if max_tokens < 1:
        raise ValueError(f"build_batch: max_tokens must be >= 1, got {max_tokens}")
    batch: list = []
    while True:
        key = max(queues, key=lambda k: len(queues[k]), default=None)
        room = max_tokens - len(batch)
        if key is None or not queues[key] or room <= 0:
            return batch
        q = queues[key]
        if len(q) <= room:
            batch += q
            q.clear()
        else:
            batch += [q.popleft() for _ in range(room)]
            return batch


def fcfs_batches(items: Sequence, keys: Sequence[int], max_tokens: int) -> list[list]:
    """First come, first served: consecutive groups of ``max_tokens`` (``keys`` unused, for symmetry)."""
    return [list(items[i: i + max_tokens]) for i in range(0, len(items), max_tokens)]


def expert_aware_batches(items: Sequence, keys: Sequence[int], max_tokens: int) -> list[list]:
    """All ``items`` in batches built by :func:`build_batch` from per-key FIFOs (arrival order kept)."""
    queues: dict[int, deque] = {}
    for item, key in zip(items, keys):
        queues.setdefault(int(key), deque()).append(item)
    out = []
    while any(queues.values()):
        out.append(build_batch(queues, max_tokens))
    return out


def compare_batching(routing: Sequence[Sequence[Sequence[Sequence[int]]]], max_tokens: int, key_layer: int = 0) -> dict:
    """``routing[r][t][l]`` = experts of request ``r``'s token ``t`` at layer ``l``. Every step, the
    next token of every request is pending; both schedulers batch them (the same number of
    batches) and we count the unique experts each batch needs per layer.

    Returns ``{"fcfs": ..., "expert_aware": ...}``, each with ``unique_experts`` (mean per batch and
    layer), ``by_layer`` and ``batches``."""
    if not routing:
        raise ValueError("compare_batching: no requests")
    steps = min(len(r) for r in routing)
    layers = len(routing[0][0])
    out = {}
    for name, scheduler in (("fcfs", fcfs_batches), ("expert_aware", expert_aware_batches)):
        per_layer: list[list[int]] = [[] for _ in range(layers)]
        n = 0
        for t in range(steps):
            reqs = list(range(len(routing)))
            keys = [routing[r][t][key_layer][0] for r in reqs]
            for batch in scheduler(reqs, keys, max_tokens):
                n += 1
                for layer in range(layers):
                    per_layer[layer].append(len({e for r in batch for e in routing[r][t][layer]}))
        out[name] = {"unique_experts": mean(x for pl in per_layer for x in pl),
                     "by_layer": [mean(pl) for pl in per_layer], "batches": n}
    return out
