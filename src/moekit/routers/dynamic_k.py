"""DA-MoE-style dynamic K (Akhavan Aghdam et al., arXiv 2409.06669): the number of experts a token
gets follows its attention-derived importance.

Only the paper's abstract is public, so the rule below is **our design** (papers.md §5.2): the
model passes each token's importance (``moekit.models.GPT`` exposes the attention it received);
``K_t = clamp(ceil(k_max * importance_t / scale), k_min, k_max)`` and the token takes its top-``K_t``
experts, weighted by a softmax over those ``K_t`` logits. ``scale`` is a running statistic kept in a
buffer and updated only in training, so a token's K never depends on other tokens of the batch
(causal at inference, like BatchNorm's running stats): by default the running max of importance;
with ``budget=b`` a multiplicative controller that keeps the mean K at ``b`` (compute parity with
fixed top-b). Load-balance and z-loss as in ``TopK``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit._checks import check_number
from moekit.routers._registry import register_router
from moekit.routing import LinearRouter, Routing, load_balancing_loss, router_z_loss


@register_router("dynamic_k")
class DynamicK(LinearRouter):
    """Args:
    k_min, k_max: range of experts per token (1 <= k_min <= k_max <= E).
    budget: target mean K (k_min <= budget <= k_max); ``None`` scales by the running max importance.
    momentum: update rate of the running scale.
    balance, z_loss: as in ``TopK``.
    """

    context_keys = ("importance",)

    def __init__(self, k_min: int = 1, k_max: int = 4, budget: float | None = None, momentum: float = 0.05,
                 balance: float = 0.01, z_loss: float = 0.001) -> None:
        super().__init__()
        check_number("k_min", k_min, lo=1, integer=True, owner="DynamicK")
        check_number("k_max", k_max, lo=k_min, integer=True, owner="DynamicK")
        if budget is not None:
            check_number("budget", budget, lo=k_min, hi=k_max, owner="DynamicK")
        check_number("momentum", momentum, lo=0, hi=1, lo_open=True, owner="DynamicK")
        self.k_min, self.k_max, self.budget, self.momentum = k_min, k_max, budget, momentum
        self.balance, self.z_loss = balance, z_loss
        self.register_buffer("scale", torch.tensor(0.0))  # 0: not calibrated yet

    def extra_repr(self) -> str:
        return f"k_min={self.k_min}, k_max={self.k_max}, budget={self.budget}"

    def check_num_experts(self, num_experts: int) -> None:
        if self.k_max > num_experts:
            raise ValueError(f"DynamicK: k_max={self.k_max} must be <= num_experts={num_experts}")

    def experts_per_token(self, importance: Tensor) -> Tensor:
        """``K_t`` for each token: non-decreasing in importance, within ``[k_min, k_max]``."""
        if self.scale > 0:
            scale = self.scale
        elif self.training:  # first training batch: calibrate on it
            scale = importance.max().clamp_min(1e-12)
        else:  # never trained: a fixed scale, so that no token's K depends on the others
            scale = torch.ones((), device=importance.device)
        k = torch.ceil(self.k_max * importance.float() / scale)
        return k.clamp(self.k_min, self.k_max).long()

    @torch.no_grad()
    def _update_scale(self, importance: Tensor, k: Tensor) -> None:
        """Update the running scale; a non-finite new value is never stored (the scale is kept)."""
        if self.budget is None:
            target = importance.max().float()
            new = target if self.scale == 0 else (1 - self.momentum) * self.scale + self.momentum * target
        elif self.scale == 0:
            # start where the batch's mean K hits the budget, then follow the running mean K
            new = importance.float().mean() * self.k_max / self.budget
        else:
            ratio = float(k.float().mean()) / self.budget
            new = self.scale * math.exp(self.momentum * math.log(max(ratio, 1e-6)))
        if bool(torch.isfinite(new)):
            self.scale.copy_(new)

    # Under torch.compile the router runs eagerly: each token's K, the ragged top-K and the running-scale
    # update read values on the host (traced, they would split the graph at every read).
    @torch.compiler.disable
    def forward(self, x_TD: Tensor, importance: Tensor | None = None, **context) -> Routing:
        self._require_bound()
        if importance is None:
            raise ValueError(
                "DynamicK needs the tokens' importance: pass importance=[T] (moekit.models.GPT does this for "
                "routers whose context_keys include 'importance')"
            )
        T, E = x_TD.shape[0], self.num_experts
        importance = importance.reshape(-1).detach()
        if importance.numel() != T:
            raise ValueError(f"DynamicK: importance has {importance.numel()} values for {T} tokens")
        bad = int((~torch.isfinite(importance)).sum()) if T else 0
        if bad:
            raise ValueError(f"DynamicK: importance has {bad} non-finite value(s) (NaN or inf) among {T}; pass a "
                             "finite importance for every token (fix what computed it, e.g. the attention before)")
        k = self.experts_per_token(importance) if T else importance.long()
        if self.training and T:
            self._update_scale(importance, k)
        logits = self.logits(x_TD)
        top_l, top_i = torch.topk(logits, self.k_max, dim=-1)  # sorted, best first
        keep = torch.arange(self.k_max, device=x_TD.device) < k.unsqueeze(-1)  # [T, k_max]
        weights = torch.softmax(top_l.masked_fill(~keep, float("-inf")), dim=-1)
        token = torch.arange(T, device=x_TD.device).unsqueeze(-1).expand_as(top_i)[keep]
        routing = Routing(token=token, expert=top_i[keep], weight=weights[keep], num_tokens=T, num_experts=E,
                          logits=logits, requested=int(k.sum()), k_per_token=k, importance=importance)
        if self.training and T:
            probs = torch.softmax(logits, dim=-1)
            if self.balance:
                routing.losses["balance"] = self.balance * load_balancing_loss(probs, routing.expert)
            if self.z_loss:
                routing.losses["z_loss"] = self.z_loss * router_z_loss(logits)
        return routing
