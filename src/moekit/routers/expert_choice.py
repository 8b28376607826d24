"""Expert-choice routing (Zhou et al. 2022): each expert picks its top tokens.

Every expert processes exactly ``C = ceil(capacity_factor * T / E)`` tokens (at most ``T``), so
the load is perfectly balanced by construction; a token may be picked by several experts or by
none. The choice looks at the whole batch, so it is not causal: use it for encoders and for
training studies, not for autoregressive decoding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit._checks import check_number
from moekit.routers._registry import register_router
from moekit.routing import LinearRouter, Routing, router_z_loss


@register_router("expert_choice")
class ExpertChoice(LinearRouter):
    """Args:
    capacity_factor: tokens per expert as a multiple of the balanced share ``T / E``
        (``capacity_factor = k`` matches the compute of token-choice top-k).
    z_loss: coefficient of the router z-loss (training only).
    """

    def __init__(self, capacity_factor: float = 2.0, z_loss: float = 0.0) -> None:
        super().__init__()
        check_number("capacity_factor", capacity_factor, lo=0, lo_open=True, owner="ExpertChoice")
        check_number("z_loss", z_loss, lo=0, owner="ExpertChoice")
        self.capacity_factor = capacity_factor
        self.z_loss = z_loss

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}, z_loss={self.z_loss}"

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

    def forward(self, x_TD: Tensor, **context) -> Routing:
        self._require_bound()
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        C = self.capacity(T)
        top_p_EC, top_t_EC = torch.topk(probs_TE.t(), C, dim=-1)
        routing = Routing(
            token=top_t_EC.reshape(-1),
            expert=torch.arange(E, device=x_TD.device).repeat_interleave(C),
            weight=top_p_EC.reshape(-1),
            num_tokens=T,
            num_experts=E,
            logits=logits_TE,
            requested=E * C,
        )
        if self.training and self.z_loss:
            routing.losses["z_loss"] = self.z_loss * router_z_loss(logits_TE)
        return routing
