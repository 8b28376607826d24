"""The expert cache and its simulator (moekit/offload/cache.py): invariants, Belady-MIN optimality,
Belady with a lookahead window against an oracle written from the rule (papers.md §2.6) and a
hand-worked stream, the bypass rules, budgets; pools for experts of different sizes (hand-worked plans and
the budget never exceeded)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moekit.offload import ExpertCache, Future, available_policies, plan_pools, simulate, slots_for_budget

# ----------------------------------------------------------------------------------- cache invariants

accesses_strategy = st.lists(
    st.tuples(st.integers(0, 2), st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True)),
    min_size=1, max_size=60)


@given(accesses=accesses_strategy, policy=st.sampled_from(available_policies()),
       partition=st.sampled_from(["layer", "global"]), slots=st.integers(1, 8), window=st.sampled_from([1, 5, math.inf]),
       direct=st.sampled_from([None, "future", 2]))
def test_cache_invariants(accesses, policy, partition, slots, window, direct):
    pools = [slots] if partition == "global" else [slots] * 3
    cache = ExpertCache(pools, 3, [100] * 3, policy, Future(accesses), window, direct=direct)
    for layer, experts in accesses:
        used = []

        def use(e, slot, layer=layer, used=used):
            # the expert is resident in its slot when it is computed (or, computed from the store,
            # not resident at all), and no slot is shared
            if slot == "store":
                assert (layer, e) not in cache.where and direct is not None
            else:
                assert cache.where[(layer, e)] == slot
            used.append(e)

        cache.access(layer, experts, use=use)
        assert sorted(used) == sorted(experts)
        for p, n in enumerate(pools):
            assert len(cache.residents[p]) <= n  # the budget is never exceeded
            assert len({cache.where[k] for k in cache.residents[p]}) == len(cache.residents[p])
    s = cache.stats
    assert s.hits + s.misses == s.accesses == sum(len(e) for _, e in accesses)
    assert s.bytes_loaded == 100 * s.misses


@given(accesses=accesses_strategy, slots=st.integers(1, 6))
def test_belady_min_is_optimal(accesses, slots):
    """Belady-MIN never loads more than any registered policy or any window, on any stream (one pool per layer)."""
    ebytes, n = [1] * 3, [6] * 3
    budget = slots * 3
    best = simulate(accesses, ebytes, n, budget, "belady").misses
    for policy in available_policies():
        assert best <= simulate(accesses, ebytes, n, budget, policy).misses
    for w in (1, 4):
        assert best <= simulate(accesses, ebytes, n, budget, "belady", window=w).misses


@given(accesses=accesses_strategy, slots=st.integers(1, 6), partition=st.sampled_from(["layer", "global"]))
def test_bypass_never_reads_more_than_belady_min(accesses, slots, partition):
    """Computing a miss from the store when the future needs it after every evictable resident never
    reads more experts than Belady-MIN (which must admit every miss)."""
    ebytes, n = [1] * 3, [6] * 3
    budget = slots * (1 if partition == "global" else 3)
    bypass = simulate(accesses, ebytes, n, budget, "belady", partition, direct="future")
    assert bypass.misses <= simulate(accesses, ebytes, n, budget, "belady", partition).misses
    assert bypass.bytes_loaded == bypass.misses


@given(requests=st.lists(st.integers(0, 4), min_size=1, max_size=12), slots=st.integers(1, 3))
def test_bypass_is_optimal_for_one_expert_per_access(requests, slots):
    """With one expert per access, Belady's rule with bypass reads exactly as few experts as the
    best of every admit / evict / bypass choice (exhaustive search over cache states)."""
    from functools import cache

    @cache
    def best(i: int, cache: frozenset) -> int:
        if i == len(requests):
            return 0
        e = requests[i]
        if e in cache:
            return best(i + 1, cache)
        options = [best(i + 1, cache)]  # computed from the store, nothing admitted
        if len(cache) < slots:
            options.append(best(i + 1, cache | {e}))
        else:
            options += [best(i + 1, (cache - {v}) | {e}) for v in cache]
        return 1 + min(options)

    seq = [(0, [e]) for e in requests]
    assert simulate(seq, [1], [5], slots, "belady", direct="future").misses == best(0, frozenset())


def test_direct_rules_known_answers():
    seq = [(0, [e]) for e in (1, 2, 3, 1, 2, 4, 1, 2)]
    # Belady's bypass: 3 and 4 are never needed again, so they are computed from the store and 1, 2 stay
    s = simulate(seq, [1], [5], 2, "belady", direct="future")
    assert (s.misses, s.direct, s.evictions) == (4, 2, 0)
    # Fiddler's rule at batch 1 freezes the cache: it loses to LRU on a stream that moves on
    moving = [(0, [e]) for e in (1, 2, 3, 3, 3, 3)]
    assert simulate(moving, [1], [5], 2, "lru", direct=2).misses == 6
    assert simulate(moving, [1], [5], 2, "lru").misses == 3
    # ... and only misses with fewer than k tokens bypass: with k = 1 nothing does
    assert simulate(moving, [1], [5], 2, "lru", direct=1).direct == 0
    cache = ExpertCache([1], 1, [1], "lru", direct=3)
    cache.access(0, [0], tokens=[5])
    cache.access(0, [1], tokens=[5])  # five tokens: admitted, evicting 0
    cache.access(0, [2], tokens=[2])  # two tokens: computed from the store
    assert (cache.stats.direct, sorted(cache.where)) == (1, [(0, 1)])
    for bad in (0, -1, "always", True, 1.5):
        with pytest.raises(ValueError, match="direct"):
            ExpertCache([1], 1, [1], "lru", direct=bad)
    with pytest.raises(ValueError, match="needs the future"):
        ExpertCache([1], 1, [1], "lru", direct="future")


def test_belady_min_known_answer():
    # one layer, 2 slots: MIN evicts the expert needed farthest ahead (6 misses), LRU always the wrong one (8)
    seq = [(0, [e]) for e in (1, 2, 3, 1, 2, 4, 1, 2)]
    assert simulate(seq, [1], [5], 2, "belady").misses == 6
    assert simulate(seq, [1], [5], 2, "lru").misses == 8
    assert simulate(seq, [1], [5], 3, "belady").misses == 4


# ----------------------------------------------------------------------------------- Belady with a lookahead window


def oracle_belady(stream, slots, window=math.inf, tokens=None):
    """Belady's rule on the visible future, written from papers.md §2.6: one expert per access, one
    pool of ``slots`` per layer; on a miss with a full pool evict the resident whose next use is
    farthest, a use counting only if it lies fewer than ``window`` tokens ahead (else +inf); ties
    (all +inf) go to the least recently used. Returns ``(misses, residents after each access)``."""
    tokens = list(range(len(stream))) if tokens is None else tokens
    pools, last, misses, trace = {}, {}, 0, []
    for t, key in enumerate(stream):
        pool = pools.setdefault(key[0], set())
        if key not in pool:
            misses += 1
            if len(pool) == slots:
                def nxt(k, t=t):
                    for u in range(t + 1, len(stream)):
                        if tokens[u] - tokens[t] >= window:
                            return math.inf
                        if stream[u] == k:
                            return u
                    return math.inf

                pool.remove(max(pool, key=lambda k: (nxt(k), -last[k])))
            pool.add(key)
        last[key] = t
        trace.append(sorted(e for p in pools.values() for _, e in p))
    return misses, trace


def _residents(seq, policy, window=math.inf, slots=2, tokens=None):
    accesses = [(0, [e]) for e in seq] if tokens is None else seq
    cache = ExpertCache([slots], 1 if tokens is None else 2, [1, 1], policy, Future(accesses, tokens), window)
    out = []
    for layer, experts in accesses:
        cache.access(layer, experts)
        if layer == 0:
            out.append(sorted(e for (lay, e) in cache.where if lay == 0))
    return cache.stats, out


def test_belady_window_hand_worked():
    """Two slots, stream 1 2 3 1 2 0 0 3 (access t is token t).
    t=2 (3 misses, 1 and 2 resident): both are seen again within 3 tokens (at 3 and 4): Belady-3 and
        MIN evict 2, the farther; LRU evicts 1, the older.
    t=4 (2 misses, 1 and 3 resident): 1 is never used again, 3 at t=7. MIN sees it and evicts 1;
        Belady-3 sees tokens 5 and 6 only, both look unused, so the tie goes to LRU: it evicts 3.
    then 0 misses (evicting the older of the unseen), hits at t=6, and 3 misses again for Belady-3 at t=7.
    """
    seq = [1, 2, 3, 1, 2, 0, 0, 3]
    lru = [[1], [1, 2], [2, 3], [1, 3], [1, 2], [0, 2], [0, 2], [0, 3]]
    belady_min = [[1], [1, 2], [1, 3], [1, 3], [2, 3], [0, 3], [0, 3], [0, 3]]
    belady_3 = [[1], [1, 2], [1, 3], [1, 3], [1, 2], [0, 2], [0, 2], [0, 3]]
    for policy, window, want, hits in (("lru", math.inf, lru, 1), ("belady", math.inf, belady_min, 3),
                                       ("belady", 3, belady_3, 2)):
        stats, got = _residents(seq, policy, window)
        assert got == want, (policy, window)
        assert (stats.hits, stats.misses, stats.evictions) == (hits, 8 - hits, 8 - hits - 2), (policy, window)
        if policy == "belady":
            assert oracle_belady([(0, e) for e in seq], 2, window) == (8 - hits, want)
        assert simulate([(0, [e]) for e in seq], [1], [6], 2, policy, window=window).misses == 8 - hits
    # window=1 token sees nothing ahead: Belady-1 is LRU here; window=4 already sees t=7 from t=4
    assert _residents(seq, "belady", 1)[1] == lru
    assert _residents(seq, "belady", 4)[1] == belady_min
    # the window counts tokens, not accesses: the same stream with a layer-1 access inside every token
    # (one global pool of 3 slots, one always held by layer 1's expert, needed next); 4 tokens ahead
    # are 8 accesses: from t=4, Belady-4 sees t=7 (Belady-MIN's choice), a window of 4 accesses would not
    two = [(layer, [e if layer == 0 else 0]) for e in seq for layer in (0, 1)]
    tok = [i // 2 for i in range(len(two))]
    assert _residents(two, "belady", 3, slots=3, tokens=tok)[1] == belady_3
    assert _residents(two, "belady", 4, slots=3, tokens=tok)[1] == belady_min
    assert _residents(two, "belady", math.inf, slots=3, tokens=tok)[1] == belady_min
    s = simulate(two, [1, 1], [6, 6], 4, "belady", window=3, tokens=tok)
    assert (s.misses, s.hits_by_layer) == (6 + 1, {0: 2, 1: 7})


single_strategy = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4), st.booleans()), min_size=1, max_size=40)


@given(stream=single_strategy, slots=st.integers(1, 3), window=st.sampled_from([1, 2, 3, 5, math.inf]))
def test_belady_window_equals_the_oracle(stream, slots, window):
    """The cache with ``window`` equals the oracle on any one-expert-per-access stream, several layers,
    several accesses per token; with ``window=inf`` the oracle is Belady-MIN."""
    tokens, tok = [], 0
    for _, _, new_token in stream:
        tok += new_token
        tokens.append(tok)
    accesses = [(layer, [e]) for layer, e, _ in stream]
    want, _ = oracle_belady([(layer, e) for layer, e, _ in stream], slots, window, tokens)
    assert simulate(accesses, [1] * 3, [5] * 3, slots * 3, "belady", window=window, tokens=tokens).misses == want


def test_global_lru_thrashes_on_the_cyclic_stream():
    # 3 layers, every token needs expert 0 of each: a global LRU of 2 slots evicts exactly the layer
    # needed next and never hits; one slot per layer hits after the first token
    seq = [(layer, [0]) for _ in range(10) for layer in range(3)]
    assert simulate(seq, [1] * 3, [2] * 3, 2, "lru", partition="global").hit_rate == 0.0
    assert simulate(seq, [1] * 3, [2] * 3, 3, "lru", partition="layer").hit_rate == pytest.approx(27 / 30)


def test_slots_for_budget():
    assert slots_for_budget(800, [100, 100], [8, 8]) == [4, 4]
    assert slots_for_budget(800, [100, 100], [8, 8], "global") == [8]
    assert slots_for_budget(10_000, [100, 100], [8, 8]) == [8, 8]  # never more than the layer's experts
    with pytest.raises(ValueError, match="minimum is 100"):
        slots_for_budget(99, [100], [8], "global")
    with pytest.raises(ValueError, match="minimum is 200 bytes"):
        slots_for_budget(150, [100, 100], [8, 8])
    with pytest.raises(ValueError, match="partition"):
        slots_for_budget(800, [100], [8], "ring")
    with pytest.raises(ValueError, match="policy"):
        ExpertCache([1], 1, [1], "fifo")
    with pytest.raises(ValueError, match="future"):
        ExpertCache([1], 1, [1], "belady")


# ------------------------------------------------------------------- pools of experts of different sizes

@pytest.mark.parametrize("budget,slots,scratch", [
    (48, [1, 1, 1], 0),  # one slot each exactly
    (72, [2, 2, 1], 0),  # every expert
    (64, [2, 1, 1], 0),  # 16 left: one more 8-byte expert, then nothing fits
    (40, [2, 0, 0], 24),  # the 16- and 24-byte pools go without a slot; a 24-byte buffer for them
])
def test_plan_pools_hand_worked(budget, slots, scratch):
    plan = plan_pools(budget, [[8, 16, 16, 8], [24]], "layer")
    assert plan.pool_of == [[0, 1, 1, 0], [2]] and plan.slot_bytes == [8, 16, 24]
    assert (plan.slots, plan.scratch) == (slots, scratch)


def test_plan_pools_global_rounding_and_bad_budgets():
    plan = plan_pools(10 ** 6, [[5, 16], [5, 16, 16]], "global")  # one pool per size; slots of whole 8-byte words
    assert plan.pool_of == [[0, 1], [0, 1, 1]] and plan.slot_bytes == [8, 16] and plan.slots == [2, 3]
    with pytest.raises(ValueError, match="holds no expert"):
        plan_pools(31, [[8, 16, 16, 8], [24]])  # 8 + a 24-byte buffer is the least
    with pytest.raises(ValueError, match="partition"):
        plan_pools(100, [[8]], "pool")


@given(sizes=st.lists(st.lists(st.sampled_from([8, 24, 40, 96]), min_size=1, max_size=6), min_size=1, max_size=3),
       budget=st.integers(0, 2000), partition=st.sampled_from(["layer", "global"]), scratch=st.sampled_from([0, 40]))
def test_plan_pools_never_exceeds_the_budget(sizes, budget, partition, scratch):
    try:
        plan = plan_pools(budget, sizes, partition, scratch)
    except ValueError:
        assert budget < min(min(s) for s in sizes) + max([scratch] + [max(s) for s in sizes])
        return
    members = [sum(row.count(p) for row in plan.pool_of) for p in range(len(plan.slots))]
    assert sum(n * b for n, b in zip(plan.slots, plan.slot_bytes)) + plan.scratch <= budget
    assert all(0 <= n <= m for n, m in zip(plan.slots, members)) and plan.scratch >= scratch
    held = [b for n, b in zip(plan.slots, plan.slot_bytes) if n]
    assert held and plan.scratch >= max([b for n, b in zip(plan.slots, plan.slot_bytes) if not n], default=0)
    if budget >= sum(b * m for b, m in zip(plan.slot_bytes, members)) + scratch:
        assert plan.slots == members  # a budget that holds every expert holds every expert
