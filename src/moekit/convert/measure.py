"""Measuring a converted model: how much of the dense FFN a token computes."""

from __future__ import annotations

import math

from torch import nn

from moekit.layer import MoE

__all__ = ["active_fraction"]


def active_fraction(model: nn.Module, dense_d_ff: int | None = None) -> float:
    """Mean fraction of the FFN hidden channels computed per token in the last forward of a
    partitioned or refactored model (a shared expert counts in full), relative to ``dense_d_ff``
    (the dense FFN's width; default: the layer's own total, right for partitions, whose experts
    add up to the dense FFN)."""
    fr = []
    for m in model.modules():
        if isinstance(m, MoE) and m.last_routing is not None:
            r = m.last_routing
            n = int((r.weight.detach() != 0).sum()) / max(r.num_tokens, 1)
            shared = m.shared_expert.down_proj.in_features if m.shared_expert is not None else 0
            fr.append((shared + n * m.d_ff) / (dense_d_ff or shared + m.num_experts * m.d_ff))
    return sum(fr) / len(fr) if fr else math.nan
