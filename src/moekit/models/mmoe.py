"""Multi-gate mixture of experts (MMoE, Ma et al. 2018) for multi-task learning.

Shared experts, one gate per task (any moekit router: ``"softmax"`` for MMoE, ``TopK``,
``DSelectK`` per-example or static), one tower per task. Each expert runs once per token for the
union of what the gates ask of it; each task combines the outputs with its own weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.dispatch import LocalDispatcher
from moekit.experts import GroupedExperts
from moekit.routers import build_router
from moekit.routing import Router, Routing


class MultiGateMoE(nn.Module):
    """Args:
    d_in: input width (experts map ``d_in -> d_ff -> d_in``).
    num_experts, d_ff, activation: the shared experts.
    gates: one router (instance or registered name) per task.
    task_out: output width of each task's tower (``int`` for all).
    tower_hidden: hidden width of the towers.
    """

    def __init__(self, d_in: int, num_experts: int, d_ff: int, gates: Sequence[Router | str],
                 task_out: int | Sequence[int] = 1, tower_hidden: int = 8, activation: str = "relu") -> None:
        super().__init__()
        if not gates:
            raise ValueError("MultiGateMoE: gates must name one router per task")
        outs = [task_out] * len(gates) if isinstance(task_out, int) else list(task_out)
        if len(outs) != len(gates):
            raise ValueError(f"MultiGateMoE: {len(gates)} gates but {len(outs)} task_out widths")
        self.num_tasks, self.num_experts = len(gates), num_experts
        self.experts = GroupedExperts(num_experts, d_in, d_ff, activation)
        self.gates = nn.ModuleList(build_router(g).bind(d_in, num_experts) for g in gates)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, tower_hidden), nn.ReLU(), nn.Linear(tower_hidden, o)) for o in outs
        )
        self.dispatcher = LocalDispatcher()
        self.last_routing: list[Routing] | None = None

    def mixtures(self, x_TD: Tensor) -> list[Tensor]:
        """Each task's mixture of expert outputs, ``[T, d_in]`` per task."""
        T, E = x_TD.shape[0], self.num_experts
        routings = [g(x_TD, task=0) if "task" in g.context_keys else g(x_TD) for g in self.gates]
        pair = torch.cat([r.token * E + r.expert for r in routings])
        uniq, inv = torch.unique(pair, return_inverse=True)  # every (token, expert) any task needs, once
        union = Routing(uniq // E, uniq % E, torch.ones(uniq.numel(), device=x_TD.device), T, E)
        x_ND, seg, _ = self.dispatcher.dispatch(x_TD, union)
        y_ND = self.experts(x_ND, seg)
        row_of = torch.empty_like(uniq)
        row_of[torch.sort(union.expert, stable=True).indices] = torch.arange(uniq.numel(), device=x_TD.device)
        outs, start = [], 0
        for r in routings:
            rows = row_of[inv[start : start + r.num_assignments]]
            start += r.num_assignments
            contrib = y_ND.index_select(0, rows) * r.weight.to(y_ND.dtype).unsqueeze(-1)
            outs.append(y_ND.new_zeros(T, y_ND.shape[-1]).index_add_(0, r.token, contrib))
        self.last_routing = routings
        return outs

    def forward(self, x_TD: Tensor) -> list[Tensor]:
        """One output per task: ``tower_t(mixture_t(x))``."""
        return [tower(m) for tower, m in zip(self.towers, self.mixtures(x_TD), strict=True)]
