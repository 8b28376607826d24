"""The expert cache: slots, eviction policies, and one bookkeeping shared by the simulator and the runtime.

An *access* is one MoE layer's forward: the layer and the set of experts its tokens need. The
access stream is cyclic (layer 0..L-1 for a token, then the next token), which is why the pool
structure matters as much as the policy: a single global LRU over that stream evicts the layer
the loop reaches next (the classic LRU worst case). So the cache is either one pool per layer
(the default, as in mixtral-offloading) or one global pool, and the experts of the layer being
computed are pinned: they are never the victim of their own layer's misses.

A miss loads the expert into a slot, evicting the policy's victim among the residents that the
current layer does not still need. The layer's experts are computed one at a time, resident ones
first, and each is unpinned once computed, so even a single slot per pool serves any access (an
expert the layer has just used may make room for the next).

Policies score residents; the victim is the lowest score. They are registered by name in
:mod:`moekit.offload.policies`, one file each:
    ``lru``      last use.
    ``lfu``      number of uses since the start (not only while resident), ties by last use.
    ``belady``   next use within a lookahead window of tokens (Belady's rule on the known part
                 of the future: the expert needed farthest ahead, or not at all, goes first), ties
                 by last use. The future (:class:`~moekit.offload.future.Future`) comes from a
                 PreGate (Read-ME: routing known before the backbone runs) or from a recorded trace;
                 with the whole future it is Belady-MIN, the offline optimum for equal-size items
                 and the yardstick of every other policy.

A miss need not be admitted: the runtime can compute the expert straight from the store (streamed
through a small buffer; nothing evicted). Two rules choose when:
    ``direct="future"``  Belady's rule with bypass: when the pool is full and the known future
                 needs the missed expert after every expert it could evict, loading it would only
                 evict something needed sooner (for one expert per access, with the whole future,
                 the offline optimum when misses may bypass; on multi-expert streams it read no
                 more than Belady-MIN in every property test).
    ``direct=k``         Fiddler's rule: an expert that fewer than ``k`` tokens of the batch need is
                 computed where it is stored once the pool is full (at batch size 1 with ``k >= 2``
                 every such miss: the cache keeps the experts it filled with first).
A direct miss reads the same bytes as a load (counted in ``bytes_loaded``); it only changes what
the cache keeps.

The same :class:`ExpertCache` runs inside :class:`moekit.offload.OffloadedExperts` with real
loads and in :func:`simulate` on a recorded trace, so the two produce the same counters (for
``direct=k`` the simulator counts one token per expert, as in batch-1 decoding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field

from moekit.offload.future import Future, Key
from moekit.offload.policies import build_policy

__all__ = ["CacheStats", "ExpertCache", "Future", "PoolPlan", "check_direct", "plan_pools", "simulate",
           "slots_for_budget"]

@dataclass
class CacheStats:
    """Counters of one run: every miss is one demand load of one expert, every prefetch one more load;
    ``bytes_loaded`` counts both."""

    accesses: int = 0  # (layer-forward, expert) pairs needed
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    prefetched: int = 0
    prefetch_hits: int = 0  # accesses served by an expert prefetched for them (not yet used before)
    low_bit: int = 0  # misses served by the expert's int8 copy (read, used once, not cached)
    direct: int = 0  # misses computed straight from the store (read, used once, not cached)
    hits_by_layer: dict[int, int] = field(default_factory=dict)
    accesses_by_layer: dict[int, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else math.nan

    @property
    def loads(self) -> int:
        return self.misses + self.prefetched

    @property
    def prefetch_precision(self) -> float:
        """Prefetched experts that were used before being evicted."""
        return self.prefetch_hits / self.prefetched if self.prefetched else math.nan

    @property
    def prefetch_recall(self) -> float:
        """Accesses that would have missed and were covered by a prefetch."""
        n = self.prefetch_hits + self.misses
        return self.prefetch_hits / n if n else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "loads": self.loads,
                "prefetch_precision": self.prefetch_precision, "prefetch_recall": self.prefetch_recall}


def check_direct(direct: str | int | Sequence[int] | None, future: Future | None, num_layers: int) -> None:
    """Raise unless ``direct`` is a valid rule (see :class:`ExpertCache`)."""
    if direct is None:
        return
    if direct == "future":
        if future is None:
            raise ValueError("direct='future' needs the future accesses: pass future=Future(trace accesses) or "
                             "future='pregate'")
        return
    ks = list(direct) if isinstance(direct, (list, tuple)) else [direct]
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks) or len(ks) not in (
            1, num_layers):
        raise ValueError(f"direct: expected None, 'future', an int k >= 1 or one per layer ({num_layers}) (compute a "
                         f"missed expert where it is stored when fewer than k tokens need it), got {direct!r}")


def slots_for_budget(budget_bytes: int, expert_bytes: Sequence[int], num_experts: Sequence[int],
                     partition: str = "layer") -> list[int]:
    """Slots per pool for a byte budget: one pool per layer (layers of equal experts get the same
    number of slots, the remainder going to the first layers; otherwise the budget is split in
    proportion to each layer's experts) or one global pool of the largest expert's size. Raises if
    the budget holds less than one expert per pool."""
    if partition not in ("layer", "global"):
        raise ValueError(f"partition: unknown value {partition!r}; valid values are 'layer', 'global'")
    if partition == "global":
        slots = [budget_bytes // max(expert_bytes)]
        need = max(expert_bytes)
    elif len(set(expert_bytes)) == 1 and len(set(num_experts)) == 1:  # equal layers: the same share each
        L, b, n = len(expert_bytes), expert_bytes[0], num_experts[0]
        whole = budget_bytes // b
        slots = [min(n, whole // L + (i < whole % L)) for i in range(L)]
        need = L * b
    else:  # shares in proportion to each layer's experts' bytes
        total = sum(b * n for b, n in zip(expert_bytes, num_experts))
        slots = [min(n, int(budget_bytes * b * n / total) // b) for b, n in zip(expert_bytes, num_experts)]
        need = max(-(-total // n) for n in num_experts)
    if min(slots) < 1:
        raise ValueError(
            f"expert cache: a budget of {budget_bytes:,} bytes holds no expert in some {partition} pool; the minimum "
            f"is {need:,} bytes (one expert per pool{' in proportion to the layers' if partition == 'layer' else ''}); "
            "raise the budget or use partition='global'"
        )
    return slots


@dataclass
class PoolPlan:
    """The pools of a cache over experts of different sizes: ``slots`` and ``slot_bytes`` per pool,
    ``pool_of[layer][expert]``, and ``scratch``: bytes of the one buffer (kept out of the slots, counted
    in the budget) that experts of a pool without slots are read into to be computed, never admitted."""

    slots: list[int]
    slot_bytes: list[int]
    pool_of: list[list[int]]
    scratch: int


def plan_pools(budget_bytes: int, sizes: Sequence[Sequence[int]], partition: str = "layer",
               scratch: int = 0) -> PoolPlan:
    """Pools for experts of different sizes (MC-MoE's per-expert widths): one pool per layer and block
    size (``partition="layer"``) or per block size (``"global"``), each slot of its experts' exact size
    in whole 8-byte words (so every part of a block is aligned).
    Every pool gets one slot, then the rest of the budget is shared in proportion to the bytes of each
    pool's experts still without one. When the budget cannot give every pool a slot, the pools of the largest experts go
    without: their experts are read into the scratch buffer when needed, never admitted (the budget
    keeps room for the largest of them, and at least ``scratch`` bytes). Raises if no pool gets a slot."""
    if partition not in ("layer", "global"):
        raise ValueError(f"partition: unknown value {partition!r}; valid values are 'layer', 'global'")
    keys: dict[tuple[int, int], int] = {}
    pool_of = [[keys.setdefault((i if partition == "layer" else 0, b), len(keys)) for b in layer]
               for i, layer in enumerate(sizes)]
    size = [-(-b // 8) * 8 for _, b in keys]
    scratch = -(-scratch // 8) * 8
    members = [sum(row.count(p) for row in pool_of) for p in range(len(size))]
    active = sorted(range(len(size)), key=lambda p: size[p])
    while active:  # the largest experts' pools go first
        need = max([scratch] + [size[p] for p in range(len(size)) if p not in active])
        left = budget_bytes - need - sum(size[p] for p in active)
        if left >= 0:
            break
        active.pop()
    else:
        raise ValueError(f"expert cache: a budget of {budget_bytes:,} bytes holds no expert beside a buffer for the "
                         f"largest; the minimum is {min(size) + max(size + [scratch]):,} bytes")
    rest = sum(size[p] * (members[p] - 1) for p in active)  # the experts still without a slot
    slots = [0] * len(size)
    for p in active:
        slots[p] = 1 + min(members[p] - 1, int(left * (members[p] - 1) / rest) if rest else 0)
    spare = left - sum(size[p] * (slots[p] - 1) for p in active)
    for p in active:  # what rounding down left over: one more slot where it fits, smallest experts first
        more = min(members[p] - slots[p], spare // size[p])
        slots[p] += more
        spare -= more * size[p]
    return PoolPlan(slots, size, pool_of, need)


class ExpertCache:
    """Which experts are resident, and where.

    Args:
        slots: slots per pool (see :func:`slots_for_budget`).
        num_layers: layers served; with one pool, every layer shares pool 0.
        expert_bytes: bytes of one expert of each layer (counted per load), or a list of each expert's.
        policy: the name of a registered policy (:func:`available_policies`): ``"lru"``, ``"lfu"``,
            ``"belady"``...
        future: the known future for ``"belady"`` (a :class:`Future` over the same access stream)
            and for ``direct="future"``.
        window: how many tokens ahead ``"belady"`` (and prefetching) may look (see :class:`Future`;
            ``inf``: Belady-MIN).
        low_bytes: bytes of one expert's int8 copy per layer (for mixed precision).
        direct: ``None``, ``"future"``, an int ``k >= 1`` or one per layer: when a miss is computed
            from the store instead of being admitted (see the module's docstring); ``"future"``
            needs ``future``.
        pool_of: the pool of each layer's each expert (:class:`PoolPlan`); default one pool per layer,
            or one for all if ``slots`` has one entry. A miss in a pool of no slot is computed from
            the store (counted as ``direct``).
    """

    def __init__(self, slots: Sequence[int], num_layers: int, expert_bytes: Sequence[int], policy: str = "lru",
                 future: Future | None = None, window: float = math.inf,
                 low_bytes: Sequence[int] | None = None, direct: str | int | None = None,
                 pool_of: Sequence[Sequence[int]] | None = None) -> None:
        check_direct(direct, future, num_layers)
        if isinstance(direct, (list, tuple)):
            direct = list(direct) if len(direct) > 1 else direct[0]
        self.policy = build_policy(policy, future, window)
        if pool_of is None and len(slots) not in (1, num_layers):
            raise ValueError(f"slots: one pool or one per layer ({num_layers}), got {len(slots)}")
        self.future, self.window, self.direct = future, window, direct
        self.pool_map = [list(p) for p in pool_of] if pool_of is not None else None
        self.one_pool = len(slots) == 1
        self.expert_bytes = list(expert_bytes)
        self.low_bytes = list(low_bytes or [0] * num_layers)
        self.free: list[list[int]] = [list(range(n - 1, -1, -1)) for n in slots]
        self.slots = list(slots)
        self.where: dict[Key, int] = {}  # resident key -> slot in its pool
        self.residents: list[set[Key]] = [set() for _ in slots]
        self.unused: set[Key] = set()  # prefetched, not accessed yet
        self.stats = CacheStats()

    def pool(self, layer: int, expert: int) -> int:
        """The pool that holds ``expert`` of ``layer``."""
        if self.pool_map is not None:
            return self.pool_map[layer][expert]
        return 0 if self.one_pool else layer

    def size(self, layer: int, expert: int) -> int:
        """Bytes of one load of ``expert`` of ``layer``."""
        b = self.expert_bytes[layer]
        return b if isinstance(b, int) else b[expert]

    @property
    def t(self) -> int:
        """Index of the current access."""
        return self.policy.t

    def access(self, layer: int, experts: Sequence[int], load: Callable[[int, int, int], None] | None = None,
               use: Callable[[int, int | str], None] | None = None, low: Collection[int] = (),
               tokens: Sequence[int] | None = None) -> None:
        """One layer forward needs ``experts``. They are served one at a time, resident ones first:
        a miss calls ``load(layer, expert, slot)`` after freeing ``slot``, then ``use(expert, slot)``
        computes it. An expert is pinned from the start of the access until it has been used, so
        the victim is never an expert this layer still needs; one slot per pool is always enough.
        A miss of an expert in ``low`` evicts nothing: ``use(expert, "int8")`` computes it from its
        int8 copy (HOBBIT), counted in ``low_bytes``. A miss the ``direct`` rule keeps out of the
        cache evicts nothing either: ``use(expert, "store")`` computes it from the store.
        ``tokens[i]``: how many tokens need ``experts[i]`` (for ``direct=k``; default 1 each)."""
        self.policy.tick()
        count = {int(e): int(n) for e, n in zip(experts, tokens)} if tokens is not None else {}
        experts = sorted({int(e) for e in experts})  # one order for the runtime and the simulator
        pending = {(layer, e) for e in experts}
        for e in experts:
            self._count(layer, e)
        order = [e for e in experts if (layer, e) in self.where] + [e for e in experts if (layer, e) not in self.where]
        for e in order:
            where = self._place(layer, e, pending, low, count.get(e, 1), load)
            if use is not None:
                use(e, where)
            pending.discard((layer, e))

    def _count(self, layer: int, e: int) -> None:
        """Count one needed expert of the current access (a hit if resident) in the stats and the history."""
        st, key = self.stats, (layer, e)
        st.accesses += 1
        st.accesses_by_layer[layer] = st.accesses_by_layer.get(layer, 0) + 1
        if key in self.where:
            st.hits += 1
            st.hits_by_layer[layer] = st.hits_by_layer.get(layer, 0) + 1
            if key in self.unused:
                st.prefetch_hits += 1
                self.unused.discard(key)
        self.policy.used(key)

    def _place(self, layer: int, e: int, pending: set[Key], low: Collection[int], tokens: int,
               load: Callable[[int, int, int], None] | None) -> int | str:
        """Where a needed expert is computed from: its slot (loaded into it on a miss), or, for a miss
        kept out of the cache, ``"int8"`` (its int8 copy) or ``"store"``."""
        key, pool, st = (layer, e), self.pool(layer, e), self.stats
        if key in self.where:
            return self.where[key]
        st.misses += 1
        if e in low:
            st.low_bit += 1
            st.bytes_loaded += self.low_bytes[layer]
            return "int8"
        st.bytes_loaded += self.size(layer, e)
        if not self.slots[pool] or self._bypass(pool, key, pending, tokens):
            st.direct += 1
            return "store"
        slot = self._slot(pool, pending)
        self.where[key] = slot
        self.residents[pool].add(key)
        if load is not None:
            self._guarded(load, layer, e, slot)
        return slot

    def _bypass(self, pool: int, key: Key, pending: set[Key], tokens: int) -> bool:
        """Whether the miss of ``key`` is computed from the store rather than admitted."""
        if self.direct is None or self.free[pool]:  # a free slot costs nothing
            return False
        if self.direct != "future":
            k = self.direct[key[0]] if isinstance(self.direct, (list, tuple)) else self.direct
            return tokens < k
        candidates = [k for k in self.residents[pool] if k not in pending]
        if not candidates:
            return False
        mine = self.future.next_use(key, self.t, self.window)
        return all(self.future.next_use(k, self.t, self.window) < mine for k in candidates)

    def prefetch(self, layer: int, experts: Sequence[int], load: Callable[[int, int, int], None] | None = None,
                 protect: set[Key] | frozenset = frozenset()) -> int:
        """Make ``experts`` of ``layer`` resident ahead of their access, evicting by the policy but
        never a key in ``protect`` (the experts the running layer still needs) nor one of these;
        ``load(layer, expert, slot)`` for each. Returns how many were loaded."""
        wanted = sorted({int(e) for e in experts})
        protect = set(protect) | {(layer, e) for e in wanted}
        n = 0
        for e in wanted:
            key, pool = (layer, e), self.pool(layer, e)
            if key in self.where or not self.slots[pool]:
                continue
            slot = self._slot(pool, protect, required=False)
            if slot is None:
                continue
            self.where[key] = slot
            self.residents[pool].add(key)
            self.policy.prefetched(key)
            self.unused.add(key)
            self.stats.prefetched += 1
            self.stats.bytes_loaded += self.size(layer, e)
            n += 1
            if load is not None:
                self._guarded(load, layer, e, slot)
        return n

    def _guarded(self, load: Callable[[int, int, int], None], layer: int, expert: int, slot: int) -> None:
        """A load that fails (checksum, short read, interrupt) leaves its expert not resident."""
        try:
            load(layer, expert, slot)
        except BaseException:
            self.drop(self.pool(layer, expert), slot)
            raise

    def drop(self, pool: int, slot: int) -> None:
        """Forget whatever ``slot`` of ``pool`` holds (its weights cannot be trusted); the slot is free."""
        key = next((k for k in self.residents[pool] if self.where[k] == slot), None)
        if key is not None:
            self.residents[pool].discard(key)
            self.unused.discard(key)
            del self.where[key]
        if slot not in self.free[pool]:
            self.free[pool].append(slot)

    def _slot(self, pool: int, pending: set[Key], required: bool = True) -> int | None:
        if self.free[pool]:
            return self.free[pool].pop()
        candidates = [k for k in self.residents[pool] if k not in pending]
        if not candidates and not required:
            return None
        victim = min(candidates, key=self.policy.score)
        self.residents[pool].discard(victim)
        self.unused.discard(victim)
        self.stats.evictions += 1
        return self.where.pop(victim)


def simulate(accesses: Sequence[tuple[int, Sequence[int]]], expert_bytes: Sequence[int], num_experts: Sequence[int],
             budget_bytes: int, policy: str = "lru", partition: str = "layer", window: float = math.inf,
             tokens: Sequence[int] | None = None, prefetch: bool = False, low_bytes: Sequence[int] | None = None,
             weights: Sequence[Sequence[float]] | None = None, low_threshold: float | None = None,
             direct: str | int | None = None) -> CacheStats:
    """Run the cache over a recorded access stream (``[(layer, experts), ...]``, ``tokens[i]`` the
    token of access ``i``) and return its counters, as the runtime would.

    ``policy="belady"`` looks ``window`` tokens ahead in the same stream (``inf``: Belady-MIN).
    ``prefetch``: before each access, the next access's experts are prefetched if they lie within
    ``window`` tokens (exact lookahead, as with a PreGate; the runtime's ``prefetch="future"``).
    ``low_threshold``: a miss of an expert whose gate weight (``weights[i]``, aligned with the
    experts of access ``i``) is below it is served by its int8 copy of ``low_bytes`` (HOBBIT); the
    budget then keeps room for one such copy, as the runtime does. ``direct``: when a miss is computed
    from the store instead of admitted (see :class:`ExpertCache`; each expert of an access counts one
    token, as in batch-1 decoding). ``expert_bytes[i]`` may list each expert's bytes (experts quantized
    at widths of their own): the pools are then :func:`plan_pools`'s."""
    if low_threshold is not None:
        if weights is None or low_bytes is None:
            raise ValueError("simulate: low_threshold needs the gate weights of the trace and low_bytes")
        budget_bytes -= max(low_bytes)
    pools = None
    if any(not isinstance(b, int) for b in expert_bytes):  # each expert's bytes: quantized at its own width
        pools = plan_pools(budget_bytes, expert_bytes, partition)
        slots = pools.slots
    else:
        slots = slots_for_budget(budget_bytes, expert_bytes, num_experts, partition)
    future = Future(accesses, tokens)
    cache = ExpertCache(slots, len(expert_bytes), expert_bytes, policy, future, window, low_bytes, direct,
                        None if pools is None else pools.pool_of)
    for t, (layer, experts) in enumerate(accesses):
        if prefetch and t + 1 < len(accesses) and future.tokens[t + 1] - future.tokens[t] < window:
            nxt_layer, nxt = accesses[t + 1]
            cache.prefetch(nxt_layer, nxt, protect={(layer, int(e)) for e in experts})
        low = () if low_threshold is None else {int(e) for e, w in zip(experts, weights[t]) if w < low_threshold}
        cache.access(layer, experts, low=low)
    return cache.stats
