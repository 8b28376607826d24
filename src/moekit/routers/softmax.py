"""Dense softmax gate (the MMoE gate): every expert, weighted by a softmax over experts."""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routers._registry import register_router
from moekit.routing import LinearRouter, Routing


@register_router("softmax")
class Softmax(LinearRouter):
    def forward(self, x_TD: Tensor, **context) -> Routing:
        self._require_bound()
        T, E = x_TD.shape[0], self.num_experts
        logits = self.logits(x_TD)
        weight = torch.softmax(logits, dim=-1)
        return Routing(
            token=torch.arange(T, device=x_TD.device).repeat_interleave(E),
            expert=torch.arange(E, device=x_TD.device).repeat(T),
            weight=weight.reshape(-1), num_tokens=T, num_experts=E, logits=logits, requested=T * E,
        )
