"""Expert pruning by a per-expert score: keep the ``num_experts`` highest-scoring experts.

Scores: ``prune-random`` (seeded random), ``prune-count`` (hard top-k counts ``n_e``),
``prune-soft`` (soft mass ``s_e``), ``reap`` (REAP saliency, Lasby et al.). ``scope="layer"`` keeps
the same ``E'`` in every layer; ``scope="global"`` ranks the experts of all layers together on their
score as a fraction of their layer's total and keeps ``Σ_l min(E', E_l)`` of them, never fewer than
the layer's ``k`` in a layer. Ties go to the lower expert id (and the earlier layer).
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.compress.method import CompressionMethod, register_compression
from moekit.compress.stats import ExpertStats
from moekit.compress.surgery import prune_layer
from moekit.layer import MoE

__all__ = ["ScorePruning", "PruneRandom", "PruneCount", "PruneSoft", "Reap", "keep_top", "global_keep"]


def keep_top(score: Tensor, n: int) -> Tensor:
    """The ids of the ``n`` highest scores, ties to the lower id, in increasing id order."""
    order = torch.sort(score.double(), descending=True, stable=True).indices
    return order[:n].sort().values


def global_keep(scores: dict[str, Tensor], total: int, least: dict[str, int]) -> dict[str, Tensor]:
    """Kept expert ids per layer when ``total`` experts are kept over all layers, ranked by score as a
    fraction of the layer's total; each layer keeps at least ``least[layer]`` (its best ones)."""
    frac = {n: s.double() / s.double().sum() if float(s.sum()) > 0 else torch.zeros_like(s, dtype=torch.float64)
            for n, s in scores.items()}
    kept = {n: set(keep_top(frac[n], least[n]).tolist()) for n in scores}
    room = total - sum(len(v) for v in kept.values())
    if room < 0:
        raise ValueError(f"global pruning: keeping {total} experts cannot leave every layer its k ({least})")
    rest = [(-float(f[e]), i, e, n) for i, (n, f) in enumerate(frac.items()) for e in range(f.numel())
            if e not in kept[n]]
    for _, _, e, n in sorted(rest)[:room]:
        kept[n].add(e)
    return {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in kept.items()}


class ScorePruning(CompressionMethod):
    """Keep the ``num_experts`` best experts of each layer by :meth:`score` (``scope="layer"``), or
    the best over all layers (``scope="global"``)."""

    def __init__(self, num_experts: int, scope: str = "layer", **settings) -> None:
        check_number("num_experts", num_experts, lo=1, integer=True, owner=self.name or type(self).__name__)
        if scope not in ("layer", "global"):
            raise ValueError(f"{self.name}: scope must be 'layer' or 'global', got {scope!r}")
        super().__init__(num_experts=num_experts, scope=scope, **settings)
        self.num_experts, self.scope = num_experts, scope
        self._global: dict[str, Tensor] = {}

    def score(self, stats: ExpertStats) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score(stats)")

    def known_score(self, stats: ExpertStats) -> Tensor:
        """:meth:`score`, or a ValueError when the statistics could not compute it (NaN)."""
        s = self.score(stats)
        if bool(torch.isnan(s).any()):
            raise ValueError(f"{self.name}: the scores of layer {stats.layer!r} are unknown: its experts are not "
                             "in-memory GroupedExperts (offloaded or quantized?); compress the original layers")
        return s

    def prepare(self, stats: dict[str, ExpertStats]) -> None:
        if self.scope == "global":
            total = sum(min(self.num_experts, st.tokens.numel()) for st in stats.values())
            least = {n: min(st.k, st.tokens.numel()) for n, st in stats.items()}
            self._global = global_keep({n: self.known_score(st) for n, st in stats.items()}, total, least)

    def compress_layer(self, moe: MoE, stats: ExpertStats) -> nn.Module:
        if self.scope == "global":
            keep = self._global[stats.layer]
        else:
            keep = keep_top(self.known_score(stats), min(self.num_experts, moe.num_experts))
        return moe if keep.numel() == moe.num_experts else prune_layer(moe, keep)


@register_compression("prune-random")
class PruneRandom(ScorePruning):
    """Keep random experts (a control): the scores are uniform draws seeded by ``seed`` and the layer name."""

    def __init__(self, num_experts: int, scope: str = "layer", seed: int = 0) -> None:
        super().__init__(num_experts, scope, seed=seed)
        self.seed = seed

    def score(self, stats: ExpertStats) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(stats.layer.encode()))
        return torch.rand(stats.tokens.numel(), generator=g, dtype=torch.float64)


@register_compression("prune-count")
class PruneCount(ScorePruning):
    """Keep the experts with the most top-k assignments ``n_e``."""

    def score(self, stats: ExpertStats) -> Tensor:
        return stats.tokens.double()


def soft_mass(stats: ExpertStats) -> Tensor:
    """``s_e``, or a ValueError when the layer's router had no logits over its experts."""
    if bool(torch.isnan(stats.soft).any()):
        raise ValueError(f"layer {stats.layer!r}: the router has no logits over the layer's experts, so the soft "
                         "mass is unknown; use hard counts")
    return stats.soft


@register_compression("prune-soft")
class PruneSoft(ScorePruning):
    """Keep the experts with the largest soft mass ``s_e`` (full softmax summed over all tokens)."""

    def score(self, stats: ExpertStats) -> Tensor:
        return soft_mass(stats)


@register_compression("reap")
class Reap(ScorePruning):
    """REAP: keep the experts of largest saliency ``mean_{x routed to e} g_e(x)·‖f_e(x)‖₂``."""

    def score(self, stats: ExpertStats) -> Tensor:
        return stats.reap
