"""Token-choice top-k routing (Switch / GShard / Mixtral / Qwen-MoE / OLMoE)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit._checks import check_number
from moekit.routers._registry import register_router
from moekit.routing import LinearRouter, Routing, load_balancing_loss, router_z_loss


def drop_over_capacity(routing: Routing, capacity: int) -> Routing:
    """Keep at most ``capacity`` assignments per expert, first come first served in token order.

    Assignments are visited in their current order (token-major for token-choice routers), so the
    outcome is deterministic. Dropped assignments are removed; the surviving weights are not
    renormalised (Switch/GShard behaviour: a dropped slot contributes nothing).
    """
    N = routing.num_assignments
    if N == 0:
        return routing
    order = torch.argsort(routing.expert, stable=True)
    counts = torch.bincount(routing.expert, minlength=routing.num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(N, device=order.device) - starts[routing.expert[order]]
    keep = torch.empty(N, dtype=torch.bool, device=order.device)
    keep[order] = pos_sorted < capacity
    kept = int(keep.sum())
    if kept == N:
        return routing
    return Routing(
        token=routing.token[keep],
        expert=routing.expert[keep],
        weight=routing.weight[keep],
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
        losses=routing.losses,
        logits=routing.logits,
        dropped=routing.dropped + (N - kept),
        requested=routing.requested,
    )


@register_router("topk")
class TopK(LinearRouter):
    """Softmax over experts in fp32, then the ``k`` most probable experts per token.

    Args:
        k: experts per token.
        renormalize: rescale the k chosen probabilities to sum to one (Mixtral, OLMoE);
            ``False`` keeps the raw softmax values (Qwen2-MoE). With ``k=1`` renormalising makes
            every weight 1, so the router learns only from the auxiliary losses: use ``False``
            (Switch Transformer) for top-1.
        capacity_factor: ``None`` is dropless. Otherwise each expert takes at most
            ``ceil(capacity_factor * T * k / E)`` assignments, in token order; the rest are dropped
            and counted in ``Routing.dropped``.
        balance: coefficient of the Switch/GShard load-balancing loss (``losses["balance"]``).
        z_loss: coefficient of the router z-loss (``losses["z_loss"]``).
        jitter: multiplicative uniform noise ``U(1-j, 1+j)`` on the router input in training.
        scale: multiply the combine weights (DeepSeek's routed scaling factor; ``scale=k`` with
            ``renormalize=True`` gives experts cut from one dense FFN their dense magnitude back).

    Losses are produced in training mode only.
    """

    def __init__(
        self,
        k: int = 2,
        renormalize: bool = True,
        capacity_factor: float | None = None,
        balance: float = 0.01,
        z_loss: float = 0.001,
        jitter: float = 0.0,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_number("k", k, lo=1, integer=True, owner="TopK")
        if capacity_factor is not None:
            check_number("capacity_factor", capacity_factor, lo=0, lo_open=True, owner="TopK")
        check_number("balance", balance, lo=0, owner="TopK")
        check_number("z_loss", z_loss, lo=0, owner="TopK")
        check_number("jitter", jitter, lo=0, hi=1, owner="TopK")
        check_number("scale", scale, lo=0, lo_open=True, owner="TopK")
        self.k = k
        self.scale = scale
        self.renormalize = bool(renormalize)
        self.capacity_factor = capacity_factor
        self.balance = balance
        self.z_loss = z_loss
        self.jitter = jitter

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, renormalize={self.renormalize}, capacity_factor={self.capacity_factor}, "
            f"balance={self.balance}, z_loss={self.z_loss}, jitter={self.jitter}"
            + (f", scale={self.scale}" if self.scale != 1.0 else "")
        )

    def check_num_experts(self, num_experts: int) -> None:
        if self.k > num_experts:
            raise ValueError(f"TopK: k={self.k} must be <= num_experts={num_experts}; valid k is 1..{num_experts}")

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.k / self.num_experts)

    def forward(self, x_TD: Tensor, **context) -> Routing:
        self._require_bound()
        T = x_TD.shape[0]
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_p_TK, top_i_TK = torch.topk(probs_TE, self.k, dim=-1)
        if self.renormalize:
            top_p_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
        if self.scale != 1.0:
            top_p_TK = top_p_TK * self.scale
        routing = Routing.from_topk(top_i_TK, top_p_TK, self.num_experts, logits=logits_TE, requested=T * self.k)
        if self.training:
            if self.balance:
                routing.losses["balance"] = self.balance * load_balancing_loss(probs_TE, routing.expert, T * self.k)
            if self.z_loss:
                routing.losses["z_loss"] = self.z_loss * router_z_loss(logits_TE)
        cap = self.capacity(T)
        if cap is not None:
            routing = drop_over_capacity(routing, cap)
        return routing
