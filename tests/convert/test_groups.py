"""Channel groups (moekit/convert/groups.py): contiguous blocks and balanced clusters."""

import pytest
import torch

from moekit.convert import cluster_groups, contiguous_groups


def _is_partition(groups: torch.Tensor, F: int, E: int) -> bool:
    return groups.shape == (E, F // E) and torch.equal(groups.flatten().sort().values, torch.arange(F)) and \
        all(torch.equal(row, row.sort().values) for row in groups)


@pytest.mark.parametrize("E", [1, 2, 4, 8, 32])
def test_cluster_groups_is_a_balanced_partition(E):
    feats = torch.randn(32, 12)
    groups = cluster_groups(feats, E)
    assert _is_partition(groups, 32, E)


def test_cluster_groups_is_deterministic_for_a_seed():
    feats = torch.randn(48, 10)
    for seed in (0, 3):
        assert torch.equal(cluster_groups(feats, 4, seed=seed), cluster_groups(feats, 4, seed=seed))
    assert _is_partition(cluster_groups(feats, 4, seed=7), 48, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_groups_recovers_separated_blobs(seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(16)[[0, 4, 8, 12]] * 5  # 4 orthogonal directions
    feats = centres.repeat_interleave(8, dim=0) + 0.1 * torch.randn(32, 16, generator=g)
    perm = torch.randperm(32, generator=g)
    feats = feats[perm]  # row perm[i] of the blobs is now row i
    blob_of_row = torch.arange(32).div(8, rounding_mode="floor")[perm]
    blobs = {frozenset(torch.nonzero(blob_of_row == b).squeeze(1).tolist()) for b in range(4)}
    groups = cluster_groups(feats, 4, seed=seed)
    assert {frozenset(row.tolist()) for row in groups} == blobs


def test_cluster_groups_errors():
    with pytest.raises(ValueError, match=r"num_experts=5 does not divide d_ff=32; valid counts: \[1, 2, 4, 8, 16, 32\]"):
        cluster_groups(torch.randn(32, 4), 5)
    with pytest.raises(ValueError, match="num_experts=0 does not divide"):
        contiguous_groups(32, 0)


@pytest.mark.parametrize(("F", "E"), [(32, 1), (32, 4), (32, 8), (12, 3)])
def test_contiguous_groups_are_the_blocks(F, E):
    f = F // E
    assert contiguous_groups(F, E).tolist() == [[e * f + j for j in range(f)] for e in range(E)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_groups_recovers_planted_clusters(seed):
    """4 orthogonal directions, 6 channels each (small noise), shuffled: the balanced clusters are
    exactly the planted sets."""
    g = torch.Generator().manual_seed(seed)
    E, size, k = 4, 6, 8
    centers = torch.eye(k)[:E] * 5
    labels = torch.arange(E).repeat_interleave(size)[torch.randperm(E * size, generator=g)]
    feats = centers[labels] + 0.3 * torch.randn(E * size, k, generator=g)
    groups = cluster_groups(feats, E, seed=seed)
    assert groups.shape == (E, size)
    assert sorted(map(sorted, groups.tolist())) == sorted(sorted(torch.nonzero(labels == e).squeeze(1).tolist())
                                                          for e in range(E))
    assert all(row == sorted(row) for row in groups.tolist())


def test_cluster_groups_stays_balanced_on_unbalanced_clusters():
    """12 channels along one direction, 4 along another, E = 2: equal sizes all the same."""
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.tensor([[5.0, 0.0]]).repeat(12, 1), torch.tensor([[0.0, 5.0]]).repeat(4, 1)])
    feats = feats + 0.1 * torch.randn(16, 2, generator=g)
    groups = cluster_groups(feats, 2)
    assert [len(r) for r in groups.tolist()] == [8, 8]
    assert sorted(groups.flatten().tolist()) == list(range(16))
    # the small cluster (channels 12..15) lies whole in one expert
    assert any(set(range(12, 16)) <= set(r) for r in groups.tolist())
