"""Read-ME's per-layer pre-gated router (Cai et al., NeurIPS 2024; papers.md §2.3): each token goes
to the expert a :class:`moekit.models.pregate.PreGate` chose for it, read from the context
``expert_ids``; top-1, weight 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routers._registry import register_router
from moekit.routing import Router, Routing

__all__ = ["PreGated"]


@register_router("pregate")
class PreGated(Router):
    """Routes each token to the expert a :class:`PreGate` chose for it (context ``expert_ids``),
    top-1 with weight 1 (Read-ME's routing: no gate value on the expert's output)."""

    context_keys = ("expert_ids",)

    def forward(self, x_TD: Tensor, expert_ids: Tensor | None = None, **context) -> Routing:
        self._require_bound()
        T = x_TD.shape[0]
        if expert_ids is None:
            raise ValueError("PreGated: needs expert_ids from a PreGate (moekit.models.GPT with GPTConfig.pregate, "
                             "or a model converted by moekit.convert.refactor)")
        ids = expert_ids.reshape(-1).to(device=x_TD.device, dtype=torch.long)
        if ids.numel() != T:
            raise ValueError(f"PreGated: {ids.numel()} expert ids for {T} tokens")
        if T and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts):
            raise ValueError(f"PreGated: expert ids must lie in [0, {self.num_experts}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return Routing(token=torch.arange(T, device=x_TD.device), expert=ids,
                       weight=torch.ones(T, dtype=x_TD.dtype, device=x_TD.device), num_tokens=T,
                       num_experts=self.num_experts)
