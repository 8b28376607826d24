"""moekit bench offload: the policy grid and the batching study on a hand-made trace."""

import math

import pytest
import torch

from moekit.apps.bench.offload import POLICIES, SERVED, simulate_grid
from moekit.apps.bench.offload.simulate import (
    MIN_LABEL,
    READ_ME_POLICIES,
    batching_study,
    check_policies,
    split_requests,
)
from moekit.offload import Trace


def _trace(stream: list[int], num_experts: int = 4, seq_len: int = 3) -> Trace:
    """One MoE layer, top-1: token ``t`` needs expert ``stream[t]``."""
    n = len(stream)
    return Trace(layer=torch.zeros(n, dtype=torch.long), token=torch.arange(n), offsets=torch.arange(n + 1),
                 experts=torch.tensor(stream), weights=torch.ones(n), token_ids=torch.zeros(n, dtype=torch.long),
                 num_experts=[num_experts], meta={"seq_len": seq_len})


def test_simulate_grid_counts_loads_by_hand():
    # 4 experts of 1 byte, budget 50%: 2 slots. Stream 0 1 2 0 1 2.
    rows = {r["policy"]: r for r in simulate_grid(_trace([0, 1, 2, 0, 1, 2]), [1], budgets=(0.5,))}
    assert [r["budget"] for r in rows.values()] == [0.5] * len(POLICIES)
    # LRU always evicts the expert needed next: 6 loads in 6 tokens
    assert rows["LRU, per layer"]["loads_per_token"] == 1.0
    assert rows["LRU, per layer"]["hit_rate"] == 0.0
    # Belady-MIN evicts 1 for 2 at t=2 (0 is needed sooner), then evicts 0 for 1 at t=4: 4 loads
    assert rows[MIN_LABEL]["loads_per_token"] == pytest.approx(4 / 6)
    assert rows[MIN_LABEL]["hit_rate_by_layer"] == [pytest.approx(2 / 6)]
    assert rows["LRU, per layer"]["vs_min"] == pytest.approx(1.5)
    assert rows[MIN_LABEL]["window"] is None and rows["Belady, lookahead 16 tokens"]["window"] == 16
    # bypass: at t=2 expert 2 is needed after 0 and 1, so it is computed from the store, not admitted
    assert rows["Belady-MIN + bypass to the store"]["direct_share"] == pytest.approx(1 / 4)
    # Fiddler's rule (threshold 2 tokens) at batch 1: both misses of expert 2 computed from the store
    assert rows["LRU + Fiddler's rule (compute misses from the store)"]["direct_share"] == 0.5
    assert rows["LRU, per layer"]["bytes_per_token"] == 1.0


def test_simulate_grid_rejects_an_unregistered_policy():
    with pytest.raises(ValueError, match="'fifo'.*not registered"):
        simulate_grid(_trace([0, 1]), [1], policies=(("FIFO", "fifo", "layer", math.inf, None),))


def test_the_bench_policies_are_registered():
    check_policies((*POLICIES, *SERVED, *READ_ME_POLICIES))


def test_split_requests_and_batching_study():
    assert split_requests([[[0]], [[1]], [[2]], [[3]], [[4]]], 2) == [[[[0]], [[1]]], [[[2]], [[3]]]]
    study = batching_study(_trace([0, 1, 2, 0, 1, 2]), (2,))
    assert list(study) == ["2"]
    assert set(study["2"]) == {"fcfs", "expert_aware"}
