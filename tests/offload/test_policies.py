"""moekit.offload.policies: the registry (a new policy is one class), online policies, unknown names,
and each built-in score rule on a hand-made history."""

import math

import pytest

from moekit.offload import ExpertCache, Future, available_policies, register_policy, simulate
from moekit.offload.policies import LFU, LRU, Belady, CachePolicy
from moekit.offload.policies.base import POLICIES


def test_built_in_policies_and_online_ones():
    assert available_policies() == ["lru", "lfu", "belady"]
    assert available_policies(online=True) == ["lru", "lfu"]
    assert (LRU.name, LFU.name, Belady.name) == ("lru", "lfu", "belady") and Belady.needs_future


def test_unknown_policy_and_missing_future():
    with pytest.raises(ValueError, match=r"policy: unknown value 'fifo'; valid values are \['lru', 'lfu', 'belady'\]"):
        ExpertCache([1], 1, [1], "fifo")
    with pytest.raises(ValueError, match="policy='belady' needs the future accesses"):
        ExpertCache([1], 1, [1], "belady")


def test_score_rules_on_a_hand_made_history():
    """Keys a, b, c of layer 0 used at accesses 0 (a), 1 (b), 2 (a), 3 (c); the future needs b at 5 and
    c at 4, a never again."""
    a, b, c = (0, 0), (0, 1), (0, 2)
    future = Future([(0, [0]), (0, [1]), (0, [0]), (0, [2]), (0, [2]), (0, [1])])
    history = {}
    for cls in (LRU, LFU, Belady):
        p = cls(future)
        for key in (a, b, a, c):
            p.tick()
            p.used(key)
        history[cls.name] = min((a, b, c), key=p.score)
    # lru: b (last use 1); lfu: b or c once each, b used earlier; belady: a, never needed again
    assert history == {"lru": b, "lfu": b, "belady": a}


def test_a_registered_policy_is_built_by_name():
    @register_policy("mru-test")
    class MRU(CachePolicy):
        def score(self, key):
            return (-self.last[key],)

    try:
        assert "mru-test" in available_policies(online=True)
        # one slot, stream 0 1 0: MRU evicts the most recent (0 when 1 comes), LRU the same here
        stats = simulate([(0, [0]), (0, [1]), (0, [0]), (0, [1])], [1], [2], 1, "mru-test", window=math.inf)
        assert stats.misses == 4
        with pytest.raises(ValueError, match="already registered"):
            register_policy("mru-test")(type("Other", (CachePolicy,), {}))
    finally:
        POLICIES.unregister("mru-test")
