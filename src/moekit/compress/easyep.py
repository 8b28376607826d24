"""EASY-EP (RUCAIBox): expert pruning by output-aware, change-weighted gate mass on demonstrations.

``Score_e = Σ_t Σ_{e ∈ topk(t)} g_{t,e} · ‖E_e(x_t)‖₂ · max(1 − cos(h_t, h_t + routed_t), 0)``, with
``h_t`` the layer's input and ``routed_t`` its routed output; the top ``num_experts`` per layer are
kept. The calibration batches are the demonstrations (the method uses the 25 longest).
"""

from __future__ import annotations

from torch import Tensor

from moekit.compress.method import register_compression
from moekit.compress.prune import ScorePruning
from moekit.compress.stats import ExpertStats

__all__ = ["EasyEP"]


@register_compression("easy-ep")
class EasyEP(ScorePruning):
    """Keep the experts of largest EASY-EP score (:attr:`ExpertStats.easyep`)."""

    def score(self, stats: ExpertStats) -> Tensor:
        return stats.easyep
