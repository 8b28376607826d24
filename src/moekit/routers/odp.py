"""Online dynamic pruning (MC-MoE, Huang et al., ICLR 2025, Eq. 5-6) around a top-2 router.

A token drops its second expert when ``w1 / w0 < mu`` (its second combine weight over its first);
``mu`` is the layer's median of that ratio on calibration data (``moekit.compress.mcmoe.calibrate_odp``).
Tokens of high importance keep both experts: with ``protect > 0`` the router takes the model's
``importance`` context and spares the ``ceil(protect * T)`` most important tokens of each call.

Importance. Eq. 6 scores token ``j`` of a sequence of ``L`` by ``||t_j||_1`` times the mean attention
it receives from the queries ``i >= j`` (:func:`attention_importance`, the full-sequence / prefill
case). A causal decoder routes token ``j`` before any later query exists, so Eq. 6 is only available
at prefill; :class:`moekit.models.GPT` passes its causal stand-in (the attention a token pays itself,
relative to uniform), which is what a decoder can use at every step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit._checks import check_number
from moekit.routers._registry import build_router, register_router
from moekit.routers.topk import TopK
from moekit.routing import Router, Routing

__all__ = ["ODP", "attention_importance", "top2_ratio"]


def top2_ratio(routing: Routing) -> Tensor:
    """``[T]`` ``w1 / w0`` of a token-major top-2 routing (each token's second weight over its first)."""
    w = routing.weight.detach().float().reshape(routing.num_tokens, 2)
    return w[:, 1] / w[:, 0].clamp_min(torch.finfo(torch.float32).tiny)


def attention_importance(x_BTD: Tensor, attn_BHTT: Tensor, received: bool = True) -> Tensor:
    """``[B, T]`` token importance of MC-MoE's Eq. 6 from the hidden states and the (causal) attention
    probabilities ``attn[b, h, query, key]``, averaged over heads.

    ``received=True`` (Eq. 6): ``I_j = ||t_j||_1 * sum_{i >= j} A[i, j] / (L - j)`` with 0-based ``j``,
    i.e. the mean attention token ``j`` receives from the ``L - j`` queries that see it. ``received=False``
    is the official code's reduction over the key axis, ``sum_i A[j, i] = 1``, giving ``||t_j||_1 / (L - j)``.
    """
    L = x_BTD.shape[1]
    A = attn_BHTT.float().mean(1)
    mass = A.sum(1) if received else A.sum(2)  # [B, T]: column sums (received) or row sums
    return x_BTD.float().abs().sum(-1) * mass / torch.arange(L, 0, -1, device=x_BTD.device, dtype=torch.float32)


@register_router("odp")
class ODP(Router):
    """A top-2 router whose tokens skip their second expert when ``w1 / w0 < mu``.

    Args:
        router: the top-2 router to prune (a ``TopK(k=2)`` instance or its keyword arguments' default).
        mu: the threshold; ``0`` prunes nothing (set it from calibration data).
        protect: fraction of each call's tokens, the most important, that keep both experts (paper 0.02).
        renormalize: give a pruned token's kept expert the pair's weight ``w0 + w1``; ``False`` keeps ``w0``.
    """

    def __init__(self, router: Router | str = "topk", mu: float = 0.0, protect: float = 0.0,
                 renormalize: bool = True) -> None:
        super().__init__()
        inner = build_router(router)
        if not isinstance(inner, TopK) or inner.k != 2 or inner.capacity_factor is not None:
            raise ValueError("ODP: router must be a dropless top-2 TopK (TopK(k=2, capacity_factor=None))")
        check_number("mu", mu, lo=0, owner="ODP")
        check_number("protect", protect, lo=0, hi=1, owner="ODP")
        self.inner, self.protect, self.renormalize = inner, protect, bool(renormalize)
        self.register_buffer("mu", torch.tensor(float(mu)))
        self.context_keys = ("importance",) if protect > 0 else ()
        if inner.bound:
            self.bind(inner.d_model, inner.num_experts)

    def extra_repr(self) -> str:
        return f"mu={float(self.mu):.4g}, protect={self.protect}, renormalize={self.renormalize}"

    def build(self, d_model: int, num_experts: int) -> None:
        self.inner.bind(d_model, num_experts)

    def forward(self, x_TD: Tensor, importance: Tensor | None = None, **context) -> Routing:
        self._require_bound()
        r = self.inner(x_TD, **context)
        T = r.num_tokens
        prune = top2_ratio(r) < self.mu
        if self.protect > 0:
            if importance is None or importance.numel() != T:
                raise ValueError(f"ODP: protect={self.protect} needs importance=[T] (T={T}) from the model; "
                                 "pass importance= or use protect=0")
            top = torch.topk(importance.detach().reshape(-1).float(), math.ceil(self.protect * T)).indices
            prune[top] = False
        w = r.weight.reshape(T, 2)
        if self.renormalize:
            w = torch.stack([torch.where(prune, w.sum(1), w[:, 0]), w[:, 1]], 1)
        keep = torch.stack([torch.ones_like(prune), ~prune], 1).reshape(-1)
        return Routing(token=r.token[keep], expert=r.expert[keep], weight=w.reshape(-1)[keep], num_tokens=T,
                       num_experts=r.num_experts, losses=r.losses, logits=r.logits, requested=r.requested,
                       k_per_token=2 - prune.long())
