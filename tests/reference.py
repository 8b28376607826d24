"""A deliberately naive MoE: loops over tokens and their experts. The correctness oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moekit import MoE, Routing
from moekit.experts import GroupedExperts


def reference_experts(x_TD: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
    """sum over assignments (t, e, w) of w * FFN_e(x[t]), one assignment at a time."""
    W1, W2 = experts.first_proj, experts.down_proj
    b1, b2 = experts.first_bias, experts.down_proj_bias
    rows = [x_TD[t] * 0 for t in range(x_TD.shape[0])]  # zero, but on the autograd graph
    for n in range(routing.num_assignments):
        t, e = int(routing.token[n]), int(routing.expert[n])
        h = W1[e] @ x_TD[t]
        if b1 is not None:
            h = h + b1[e]
        if experts.act.gated:
            g, u = h.chunk(2)
            h = experts.act.fn(g) * u
        else:
            h = experts.act.fn(h)
        o = W2[e] @ h
        if b2 is not None:
            o = o + b2[e]
        rows[t] = rows[t] + routing.weight[n].to(o.dtype) * o
    if not rows:
        return x_TD * 0
    return torch.stack(rows)


def reference_moe(moe: MoE, x: torch.Tensor, routing: Routing | None = None) -> tuple[torch.Tensor, Routing]:
    """The naive forward of a whole MoE layer; returns the output and the routing it used."""
    x_TD = x.reshape(-1, moe.d_model)
    if routing is None:
        routing = moe.gate(x_TD)
    y = reference_experts(x_TD, routing, moe.experts)
    if moe.shared_expert is not None:
        s = moe.shared_expert(x_TD)
        if moe.shared_expert_gate is not None:
            s = torch.sigmoid(moe.shared_expert_gate(x_TD)) * s
        y = y + s
    return y.reshape(x.shape), routing


def reference_topk(logits_TE: torch.Tensor, k: int, renormalize: bool, capacity_factor: float | None):
    """Naive top-k routing with token-order capacity: list of (token, expert, weight) and #dropped."""
    T, E = logits_TE.shape
    probs = torch.softmax(logits_TE.detach().double(), dim=-1)
    out = []
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-float(probs[t, e]), e))[:k]
        ws = [float(probs[t, e]) for e in order]
        if renormalize:
            s = sum(ws)
            ws = [w / s for w in ws]
        out += [(t, e, w) for e, w in zip(order, ws)]
    dropped = 0
    if capacity_factor is not None:
        cap = math.ceil(capacity_factor * T * k / E)
        used = [0] * E
        kept = []
        for t, e, w in out:
            if used[e] < cap:
                used[e] += 1
                kept.append((t, e, w))
            else:
                dropped += 1
        out = kept
    return out, dropped


def dense_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    g, u = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w_down)


def identity_router(router, E):
    """Bind a linear router to d_model = E with the identity weight: its logits are the input."""
    router.bind(E, E)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router
