"""HC-SMoE's clustering against hand-made points and a from-scratch linkage loop; its merges and controls."""

import itertools

import pytest
import torch

from moekit import MoE
from moekit.compress import ExpertStats, build_compression, cluster, expert_outputs
from moekit.routers import GroupedTopK, TopK

# on a line: A=0, B=2, C=4, D=6.5, E=9.5, F=10
LINE = torch.tensor([[0.0], [2.0], [4.0], [6.5], [9.5], [10.0]])


@pytest.mark.parametrize("linkage,n,want", [
    # single chains A-B-C-D (gaps 2, 2, 2.5) before D-E (3)
    ("single", 2, [0, 0, 0, 0, 1, 1]),
    ("single", 3, [0, 0, 0, 1, 2, 2]),
    # complete: EF, AB, CD; then max(CD, EF) = 6 < max(AB, CD) = 6.5
    ("complete", 2, [0, 0, 1, 1, 1, 1]),
    ("complete", 3, [0, 0, 1, 1, 2, 2]),
    # average: EF, AB, CD; then mean(AB, CD) = 4.25 < mean(CD, EF) = 4.5
    ("average", 2, [0, 0, 0, 0, 1, 1]),
    ("average", 3, [0, 0, 1, 1, 2, 2]),
    ("average", 6, [0, 1, 2, 3, 4, 5]),
    ("single", 1, [0] * 6),
])
def test_linkage_on_hand_made_points_gives_the_known_clusters(linkage, n, want):
    assert cluster(LINE, n, linkage) == want


def test_average_linkage_weighs_clusters_by_their_size():
    # 0, 1, 4, 9, 16: {0, 1}, then {0, 1, 4}; then mean(9, 8, 5) = 7.33 from it to 9 exceeds 9-16 = 7
    # (a size-blind mean of the two halves, (8.5 + 5) / 2 = 6.75, would join 9 to the left instead)
    squares = torch.tensor([[0.0], [1.0], [4.0], [9.0], [16.0]])
    assert cluster(squares, 2, "average") == [0, 0, 0, 1, 1]


def _naive(points, n, linkage):
    reduce = {"single": min, "complete": max, "average": lambda v: sum(v) / len(v)}[linkage]
    clusters = [[i] for i in range(len(points))]
    while len(clusters) > n:
        def d(a, b):
            return reduce([float((points[i] - points[j]).norm()) for i in a for j in b])
        a, b = min(itertools.combinations(range(len(clusters)), 2), key=lambda p: d(clusters[p[0]], clusters[p[1]]))
        clusters[a] += clusters.pop(b)
    label = {i: g for g, c in enumerate(sorted(clusters, key=min)) for i in c}
    return [label[i] for i in range(len(points))]


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_linkage_matches_a_from_scratch_loop(linkage):
    torch.manual_seed(1)
    for E, n in [(7, 3), (9, 2), (10, 6)]:
        pts = torch.randn(E, 3)
        assert cluster(pts, n, linkage) == _naive(pts, n, linkage)
    with pytest.raises(ValueError, match="linkage must be one of"):
        cluster(pts, 2, "ward")


def _layer_with_twins():
    """Experts 0 and 2 nearly equal, 1 and 3 nearly equal."""
    torch.manual_seed(0)
    moe = MoE(4, 6, 4, router=TopK(k=2)).eval()
    with torch.no_grad():
        for a, b in [(0, 2), (1, 3)]:
            moe.experts.gate_up_proj[b] = moe.experts.gate_up_proj[a] + 1e-3 * torch.randn(12, 4)
            moe.experts.down_proj[b] = moe.experts.down_proj[a] + 1e-3 * torch.randn(4, 6)
    return moe


def _stats(moe, tokens):
    st = ExpertStats.empty(4, layer="x")
    st.tokens += torch.tensor(tokens)
    x = torch.randn(50, 4)
    with torch.no_grad():
        st.output_sum = expert_outputs(moe.experts, x).sum(1).double()
    st.num_tokens = 50
    return st


def test_hc_smoe_merges_the_twins_with_frequency_weights_and_the_controls_differ():
    moe = _layer_with_twins()
    st = _stats(moe, [3, 4, 1, 0])
    w = moe.experts.down_proj.detach()
    merged = build_compression("hc-smoe", num_experts=2).compress_layer(moe, st)
    assert isinstance(merged.gate, GroupedTopK) and merged.gate.groups == [0, 1, 0, 1]
    torch.testing.assert_close(merged.experts.down_proj[0], 0.75 * w[0] + 0.25 * w[2])
    torch.testing.assert_close(merged.experts.down_proj[1], w[1])  # expert 3 was never used: weight 0
    uniform = build_compression("merge-uniform", num_experts=2).compress_layer(moe, st)
    assert uniform.gate.groups == [0, 1, 0, 1]
    torch.testing.assert_close(uniform.experts.down_proj[0], 0.5 * w[0] + 0.5 * w[2])
    st = _stats(moe, [0, 0, 0, 0])  # no frequency at all: uniform within each group
    merged = build_compression("hc-smoe", num_experts=2).compress_layer(moe, st)
    torch.testing.assert_close(merged.experts.down_proj[1], 0.5 * w[1] + 0.5 * w[3])


def test_random_groups_are_seeded_and_never_empty():
    moe = MoE(4, 6, 8, router=TopK(k=2)).eval()
    seen = set()
    for seed in range(6):
        st = ExpertStats.empty(8, layer="y")
        st.tokens += 1
        m = build_compression("merge-random", num_experts=3, seed=seed).compress_layer(moe, st)
        again = build_compression("merge-random", num_experts=3, seed=seed).compress_layer(moe, st)
        assert m.gate.groups == again.gate.groups and sorted(set(m.gate.groups)) == [0, 1, 2]
        seen.add(tuple(m.gate.groups))
    assert len(seen) > 3
    with pytest.raises(ValueError, match="linkage must be one of"):
        build_compression("hc-smoe", num_experts=2, linkage="ward")
