"""Expert-aware batching, Read-ME's Algorithm 1 (moekit/offload/batching.py), on hand-worked answers.

Algorithm 1 (papers.md §2.6, the E/k typo fixed): repeatedly take the expert with the most pending
tokens; if its whole FIFO fits in the room left, add it and clear it, else add its first tokens up to
the room and stop. Ties between equally long queues go to the first key (ours: the paper is silent).
"""

from collections import deque

import pytest

from moekit.offload import build_batch, compare_batching, expert_aware_batches, fcfs_batches


def _queues(**qs):
    return {int(k[1:]): deque(v) for k, v in qs.items()}


def test_build_batch_is_read_me_algorithm_1():
    queues = _queues(e0="abc", e1="d", e2="ef")
    # longest (e0, 3) whole; room 1: the next longest (e2, 2) does not fit, its first item fills the batch
    assert build_batch(queues, 4) == list("abce")
    assert {k: "".join(q) for k, q in queues.items()} == {0: "", 1: "d", 2: "f"}
    assert build_batch(queues, 4) == list("df")  # a tie: the first key first
    assert build_batch(queues, 4) == []
    with pytest.raises(ValueError, match="max_tokens"):
        build_batch(queues, 0)


def test_build_batch_takes_the_longest_queue_not_the_first_nor_the_shortest():
    queues = _queues(e0="a", e1="bcd", e2="ef")
    assert build_batch(queues, 3) == list("bcd")  # first key would give "abc", shortest "aef"
    assert build_batch(queues, 3) == list("efa")
    queues = _queues(e0="ab", e1="cdefgh", e2="ij")
    # the longest queue does not fit: its first (oldest) 4 tokens fill the batch, the rest wait in order
    assert build_batch(queues, 4) == list("cdef")
    assert {k: "".join(q) for k, q in queues.items()} == {0: "ab", 1: "gh", 2: "ij"}
    assert build_batch(queues, 5) == list("abghi")


def test_expert_aware_batches_known_answer():
    items = list(range(10))
    keys = [i % 3 for i in items]  # queues 0: [0 3 6 9], 1: [1 4 7], 2: [2 5 8]
    assert expert_aware_batches(items, keys, 4) == [[0, 3, 6, 9], [1, 4, 7, 2], [5, 8]]
    assert fcfs_batches(items, keys, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    keys = [5, 1, 1, 5, 1, 7]  # queues 1: [1 2 4], 5: [0 3], 7: [5]
    assert expert_aware_batches(list("abcdef"), keys, 3) == [list("bce"), list("adf")]


def test_compare_batching_known_answers():
    # 8 requests, 2 steps, 1 layer: request r needs expert r % 2; batches of 4
    routing = [[[[r % 2]], [[r % 2]]] for r in range(8)]
    res = compare_batching(routing, 4)
    assert res["expert_aware"]["unique_experts"] == 1.0 and res["fcfs"]["unique_experts"] == 2.0
    assert res["expert_aware"]["batches"] == res["fcfs"]["batches"] == 4
    # 4 requests, 1 step, 2 layers, batches of 2. Layer 0 experts [0, 1, 0, 1], layer 1 [5, 6, 7, 6].
    routing = [[[[0], [5]]], [[[1], [6]]], [[[0], [7]]], [[[1], [6]]]]
    # FCFS {0, 1} {2, 3}: layer 0 -> 2, 2; layer 1 -> {5, 6} 2, {7, 6} 2
    # keyed by layer 0: {0, 2} {1, 3}: layer 0 -> 1, 1; layer 1 -> {5, 7} 2, {6} 1
    res = compare_batching(routing, 2)
    assert res["fcfs"] == {"unique_experts": 2.0, "by_layer": [2, 2], "batches": 2}
    assert res["expert_aware"] == {"unique_experts": 1.25, "by_layer": [1, 1.5], "batches": 2}
    # the key layer matters: layer 0 experts [0, 1, 0, 1], layer 1 [5, 5, 6, 6]
    routing = [[[[0], [5]]], [[[1], [5]]], [[[0], [6]]], [[[1], [6]]]]
    assert compare_batching(routing, 2)["expert_aware"]["by_layer"] == [1, 2]  # {0, 2} {1, 3}
    assert compare_batching(routing, 2, key_layer=1)["expert_aware"]["by_layer"] == [2, 1]  # {0, 1} {2, 3}
    # a top-2 layer: the key is the token's first expert, the count every expert of the batch
    routing = [[[[0, 3]]], [[[1, 3]]], [[[0, 2]]]]
    res = compare_batching(routing, 2)  # expert-aware: {0, 2} -> {0, 3, 2} = 3, {1} -> {1, 3} = 2
    assert res["expert_aware"]["by_layer"] == [2.5] and res["fcfs"]["by_layer"] == [2.5]  # fcfs: {0,1,3}, {0,2}
    with pytest.raises(ValueError, match="no requests"):
        compare_batching([], 2)
