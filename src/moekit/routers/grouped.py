"""Top-k over the original experts' logits, served by merged expert groups (HC-SMoE / M-SMoE).

After merging, ``E`` original experts share ``E'`` merged experts: the router keeps its ``E`` logit
rows, picks the top ``k`` of them as before, then sends each pick to its expert's group. A token
whose picks fall in the same group meets that group once, with the sum of their weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.routers._registry import register_router
from moekit.routing import LinearRouter, Routing, load_balancing_loss, router_z_loss


@register_router("grouped")
class GroupedTopK(LinearRouter):
    """Softmax over ``len(groups)`` logits in fp32, top ``k``, then expert ``i`` -> group ``groups[i]``.

    Args:
        groups: the group (merged expert) of each original expert; the layer has ``max(groups) + 1``
            experts and every group must have a member. ``None``: each expert its own group (plain top-k).
        k: original experts picked per token.
        renormalize: rescale the k picked probabilities to sum to one before grouping.
        balance, z_loss: coefficients of the load-balancing loss (over the original experts) and
            of the z-loss, in training mode only.
        scale: multiply the combine weights.
    """

    def __init__(self, groups: list[int] | None = None, k: int = 2, renormalize: bool = True, balance: float = 0.01,
                 z_loss: float = 0.001, scale: float = 1.0) -> None:
        super().__init__()
        if groups is not None:
            groups = [int(g) for g in groups]
            if not groups or min(groups) < 0:
                raise ValueError(f"GroupedTopK: groups must be a non-empty list of group ids >= 0, got {groups}")
            missing = sorted(set(range(max(groups) + 1)) - set(groups))
            if missing:
                raise ValueError(f"GroupedTopK: groups {missing} have no member; number the groups 0..E'-1")
        check_number("k", k, lo=1, hi=None if groups is None else len(groups), integer=True, owner="GroupedTopK")
        check_number("balance", balance, lo=0, owner="GroupedTopK")
        check_number("z_loss", z_loss, lo=0, owner="GroupedTopK")
        check_number("scale", scale, lo=0, lo_open=True, owner="GroupedTopK")
        self.groups, self.k, self.renormalize = groups, k, bool(renormalize)
        self.balance, self.z_loss, self.scale = balance, z_loss, scale

    def extra_repr(self) -> str:
        return f"groups={self.groups}, k={self.k}, renormalize={self.renormalize}"

    def check_num_experts(self, num_experts: int) -> None:
        if self.groups is None:
            if self.k > num_experts:
                raise ValueError(f"GroupedTopK: k={self.k} must be <= num_experts={num_experts}")
        elif num_experts != max(self.groups) + 1:
            raise ValueError(f"GroupedTopK: groups name {max(self.groups) + 1} merged experts but the layer has "
                             f"num_experts={num_experts}")

    def build(self, d_model: int, num_experts: int) -> None:
        if self.groups is None:
            self.groups = list(range(num_experts))
        self.register_buffer("group_of", torch.tensor(self.groups, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.empty(len(self.groups), d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: Tensor, **context) -> Routing:
        self._require_bound()
        T, G = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_p_TK, top_i_TK = torch.topk(probs_TE, self.k, dim=-1)
        if self.renormalize:
            top_p_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True)
        top_p_TK = top_p_TK * self.scale
        # coalesce (token, group) pairs: one assignment per pair, the weights summed
        token_TK = torch.arange(T, device=x_TD.device)[:, None].expand(T, self.k)
        key, inverse = torch.unique(token_TK * G + self.group_of[top_i_TK], return_inverse=True)
        weight = top_p_TK.new_zeros(key.numel()).index_add(0, inverse.reshape(-1), top_p_TK.reshape(-1))
        routing = Routing(token=key // G, expert=key % G, weight=weight, num_tokens=T, num_experts=G,
                          logits=logits_TE, requested=T * self.k)
        if self.training:
            if self.balance:
                routing.losses["balance"] = self.balance * load_balancing_loss(probs_TE, top_i_TK.reshape(-1), T * self.k)
            if self.z_loss:
                routing.losses["z_loss"] = self.z_loss * router_z_loss(logits_TE)
        return routing
