"""HC-SMoE (Chen et al., ICML 2025): merge experts grouped by hierarchical clustering of their mean
outputs, plus the controls that isolate its two choices.

- ``hc-smoe``: agglomerative clustering of the experts' mean outputs ``o_e`` (Euclidean; ``average``,
  ``single`` or ``complete`` linkage) into ``E'`` groups, each merged with the frequency weights
  ``f_i / Σ_{j ∈ g} f_j`` (``f`` the hard top-k counts; uniform in a group no token reached).
- ``merge-uniform``: the same groups, averaged uniformly.
- ``merge-random``: random groups (every group non-empty), frequency-weighted.
The merged layer keeps the original router (:class:`moekit.routers.GroupedTopK`).
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.compress.method import CompressionMethod, register_compression
from moekit.compress.stats import ExpertStats
from moekit.compress.surgery import merge_layer
from moekit.layer import MoE

__all__ = ["LINKAGES", "cluster", "frequency_coeffs", "HCSMoE", "MergeUniform", "MergeRandom", "renumber"]

LINKAGES = ("average", "single", "complete")


def renumber(labels: list[int]) -> list[int]:
    """The same partition, groups numbered by their first member."""
    first: dict[int, int] = {}
    return [first.setdefault(g, len(first)) for g in labels]


def cluster(points: Tensor, n_clusters: int, linkage: str = "average") -> list[int]:
    """Agglomerative clustering of ``points [E, D]`` (Euclidean) into ``n_clusters`` groups: the
    closest two clusters merge until ``n_clusters`` remain (ties: the lowest pair of cluster ids).
    Returns each point's group, numbered by first member."""
    if linkage not in LINKAGES:
        raise ValueError(f"cluster: linkage must be one of {LINKAGES}, got {linkage!r}")
    E = points.shape[0]
    check_number("n_clusters", n_clusters, lo=1, hi=E, integer=True, owner="cluster")
    dist = torch.cdist(points.double(), points.double())
    dist.fill_diagonal_(torch.inf)
    size = torch.ones(E, dtype=torch.float64)
    labels = list(range(E))
    alive = E
    while alive > n_clusters:
        flat = int(torch.argmin(dist))  # first minimum in row-major order: the lowest pair
        a, b = sorted(divmod(flat, E))
        if linkage == "single":
            merged = torch.minimum(dist[a], dist[b])
        elif linkage == "complete":
            merged = torch.maximum(dist[a], dist[b])
        else:
            merged = (size[a] * dist[a] + size[b] * dist[b]) / (size[a] + size[b])
        dist[a], dist[:, a] = merged, merged
        dist[a, a] = torch.inf
        dist[b], dist[:, b] = torch.inf, torch.inf
        size[a] += size[b]
        labels = [a if g == b else g for g in labels]
        alive -= 1
    return renumber(labels)


def frequency_coeffs(groups: list[int], freq: Tensor) -> Tensor:
    """``f_i / Σ_{j in i's group} f_j``; uniform within a group whose frequencies sum to 0."""
    g = torch.tensor(groups)
    f = freq.double()
    total = torch.zeros(max(groups) + 1, dtype=torch.float64).index_add_(0, g, f)
    size = torch.bincount(g).double()
    return torch.where(total[g] > 0, f / total[g].clamp_min(1e-300), 1.0 / size[g])


class _Merging(CompressionMethod):
    """Merge each layer into ``num_experts`` groups chosen by :meth:`groups`, with :meth:`coeffs`."""

    def __init__(self, num_experts: int, **settings) -> None:
        check_number("num_experts", num_experts, lo=1, integer=True, owner=self.name or type(self).__name__)
        super().__init__(num_experts=num_experts, **settings)
        self.num_experts = num_experts

    def groups(self, stats: ExpertStats, n: int) -> list[int]:
        raise NotImplementedError

    def coeffs(self, groups: list[int], stats: ExpertStats) -> Tensor:
        return frequency_coeffs(groups, stats.tokens)

    def compress_layer(self, moe: MoE, stats: ExpertStats) -> nn.Module:
        n = min(self.num_experts, moe.num_experts)
        if n == moe.num_experts:
            return moe
        groups = self.groups(stats, n)
        return merge_layer(moe, groups, self.coeffs(groups, stats))


@register_compression("hc-smoe")
class HCSMoE(_Merging):
    """Groups by ``linkage`` clustering of the mean outputs; frequency-weighted merge."""

    def __init__(self, num_experts: int, linkage: str = "average") -> None:
        if linkage not in LINKAGES:
            raise ValueError(f"{self.name}: linkage must be one of {LINKAGES}, got {linkage!r}")
        super().__init__(num_experts, linkage=linkage)
        self.linkage = linkage

    def groups(self, stats: ExpertStats, n: int) -> list[int]:
        return cluster(stats.mean_output, n, self.linkage)


@register_compression("merge-uniform")
class MergeUniform(HCSMoE):
    """HC-SMoE's groups, averaged uniformly."""

    def coeffs(self, groups: list[int], stats: ExpertStats) -> Tensor:
        return frequency_coeffs(groups, torch.zeros(len(groups)))


@register_compression("merge-random")
class MergeRandom(_Merging):
    """Random groups (seeded by ``seed`` and the layer name; every group non-empty), frequency-weighted merge."""

    def __init__(self, num_experts: int, seed: int = 0) -> None:
        super().__init__(num_experts, seed=seed)
        self.seed = seed

    def groups(self, stats: ExpertStats, n: int) -> list[int]:
        E = stats.tokens.numel()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(stats.layer.encode()))
        labels = torch.randint(0, n, (E,), generator=g)
        labels[torch.randperm(E, generator=g)[:n]] = torch.arange(n)
        return renumber(labels.tolist())
