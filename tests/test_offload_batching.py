"""Expert-aware batching, Read-ME's Algorithm 1 (moekit/offload/batching.py)."""

import pytest


def test_build_batch_is_read_me_algorithm_1():
    from collections import deque

    from moekit.offload import build_batch, compare_batching, expert_aware_batches

    queues = {0: deque("abc"), 1: deque("d"), 2: deque("ef")}
    assert build_batch(queues, 4) == list("abce")  # longest queue whole, then the next fills the room and stops
    assert build_batch(queues, 4) == list("df")
    assert build_batch(queues, 4) == []
    with pytest.raises(ValueError, match="max_tokens"):
        build_batch(queues, 0)
    items = list(range(10))
    keys = [i % 3 for i in items]
    batches = expert_aware_batches(items, keys, 4)
    assert sorted(x for b in batches for x in b) == items and all(len(b) <= 4 for b in batches)
    # 8 requests, 2 steps, 1 layer: request r needs expert r % 2; batches of 4
    routing = [[[[r % 2]], [[r % 2]]] for r in range(8)]
    res = compare_batching(routing, 4)
    assert res["expert_aware"]["unique_experts"] == 1.0 and res["fcfs"]["unique_experts"] == 2.0
    assert res["expert_aware"]["batches"] == res["fcfs"]["batches"] == 4
