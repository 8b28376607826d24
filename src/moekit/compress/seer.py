"""SEER-MoE (Muzio, Sun, He, 2024): heavy-hitter pruning, then fine-tuning with a router-entropy
penalty so that inference can route to fewer experts per token.

- Stage 1, ``seer``: keep the experts with the most hard top-k hits (``counts="hard"``) or the most
  soft mass (``counts="soft"``), layer-wise or global (never fewer than ``k`` per layer).
- Stage 2, :func:`seer_finetune`: ``L = L_task + λ·H``, ``H`` the mean entropy of the routers'
  softmax over every MoE layer (mean over the layers).
- Top-k adaptation, :func:`set_top_k`: route every top-k layer to ``k`` experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.compress.method import register_compression
from moekit.compress.prune import ScorePruning, soft_mass
from moekit.compress.stats import ExpertStats
from moekit.compress.surgery import sync_config
from moekit.layer import MoE
from moekit.routers import GroupedTopK, TopK
from moekit.routing import entropy
from moekit.train.step import fine_tune

__all__ = ["Seer", "router_entropy", "seer_finetune", "set_top_k"]


@register_compression("seer")
class Seer(ScorePruning):
    """Heavy-hitter pruning on hard counts or soft mass, ``scope`` ``"layer"`` or ``"global"``."""

    def __init__(self, num_experts: int, scope: str = "layer", counts: str = "hard") -> None:
        if counts not in ("hard", "soft"):
            raise ValueError(f"seer: counts must be 'hard' or 'soft', got {counts!r}")
        super().__init__(num_experts, scope, counts=counts)
        self.counts = counts

    def score(self, stats: ExpertStats) -> Tensor:
        return stats.tokens.double() if self.counts == "hard" else soft_mass(stats)


def router_entropy(model: nn.Module) -> Tensor:
    """Mean over the MoE layers of the mean entropy of their last forward's router softmax."""
    values = [entropy(torch.softmax(m.last_routing.logits, dim=-1)) for m in model.modules()
              if isinstance(m, MoE) and m.last_routing is not None and m.last_routing.logits is not None]
    if not values:
        raise ValueError("router_entropy: no MoE layer with router logits ran; run the model first")
    return torch.stack(values).mean()


def seer_finetune(model: nn.Module, batches: Callable[[int], tuple[Tensor, Tensor]], steps: int,
                  entropy: float = 0.0, lr: float = 1e-4, **fine_tune_args) -> list[float]:
    """SEER stage 2: ``steps`` AdamW updates (:func:`moekit.train.step.fine_tune`) on
    ``model.loss(x, y) + entropy · router_entropy(model)`` plus the MoE auxiliary losses of
    ``batches(step) -> (x, y)``; returns the losses. ``entropy=0`` is the plain fine-tuning control."""
    check_number("entropy", entropy, lo=0, owner="seer_finetune")
    check_number("steps", steps, lo=0, integer=True, owner="seer_finetune")

    def loss(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        task = m.loss(x, y)
        return task + entropy * router_entropy(m) if entropy else task

    return fine_tune(model, batches, steps, lr, lm_loss=loss, **fine_tune_args)


def set_top_k(model: nn.Module, k: int) -> nn.Module:
    """Route every top-k MoE layer of ``model`` to ``k`` experts per token (SEER's top-k adaptation),
    in place, and update the model's description; returns the model."""
    check_number("k", k, lo=1, integer=True, owner="set_top_k")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE) and isinstance(m.gate, (TopK, GroupedTopK))]
    if not layers:
        raise ValueError("set_top_k: the model has no MoE layer routed by TopK or GroupedTopK")
    for name, m in layers:
        most = m.gate.weight.shape[0]
        if k > most:
            raise ValueError(f"set_top_k: k={k} exceeds the {most} experts of layer {name!r}; use k <= {most}")
    for _, m in layers:
        m.gate.k = k
    sync_config(model)
    return model
