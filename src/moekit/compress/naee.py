"""NAEE / O-prune (Lu et al., ACL 2024): per layer, the kept subset of ``E'`` experts whose layer
output is closest to the full layer's on calibration inputs, by enumerating every subset.

The pruned layer routes top-k over the survivors' logits (as :func:`moekit.compress.surgery.prune_layer`
builds it), so ``F_S(x) = Σ_{e ∈ topk_S(x)} g^S_e(x) f_e(x)``; the error is ``‖F(x) − F_S(x)‖_F`` over
all kept calibration rows (the shared expert cancels). ``C(E, E')`` above ``max_subsets`` is refused.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.compress.method import CompressionMethod, register_compression
from moekit.compress.stats import ExpertStats, expert_outputs
from moekit.compress.surgery import prune_layer, topk_router
from moekit.layer import MoE
from moekit.routers import TopK

__all__ = ["Naee", "routed_output"]


def routed_output(gate: TopK, logits_TE: Tensor, outs_ETD: Tensor, subset: Tensor) -> Tensor:
    """``[T, D]``: the routed output of a layer whose router keeps only ``subset``'s logits."""
    subset = subset.to(logits_TE.device)
    probs = torch.softmax(logits_TE[:, subset], dim=-1)
    top_p, top_i = torch.topk(probs, min(gate.k, subset.numel()), dim=-1)
    if gate.renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    top_p = top_p * gate.scale
    chosen = outs_ETD[subset[top_i], torch.arange(logits_TE.shape[0], device=logits_TE.device)[:, None]]  # [T, K, D]
    return (top_p[..., None] * chosen).sum(1)


@register_compression("naee")
class Naee(CompressionMethod):
    """Keep, per layer, the ``num_experts`` experts whose pruned layer best matches the full one
    on up to ``max_tokens`` calibration rows; at most ``max_subsets`` subsets are tried per layer."""

    def __init__(self, num_experts: int, max_subsets: int = 5000, max_tokens: int = 4096) -> None:
        check_number("num_experts", num_experts, lo=1, integer=True, owner="naee")
        check_number("max_subsets", max_subsets, lo=1, integer=True, owner="naee")
        check_number("max_tokens", max_tokens, lo=1, integer=True, owner="naee")
        super().__init__(num_experts=num_experts, max_subsets=max_subsets, max_tokens=max_tokens)
        self.num_experts, self.max_subsets, self.keep_inputs = num_experts, max_subsets, max_tokens

    @torch.no_grad()
    def best_subset(self, moe: MoE, x_TD: Tensor) -> Tensor:
        """The kept expert ids (increasing) of least output error on ``x_TD``."""
        gate = topk_router(moe, "naee")
        E, n = moe.num_experts, min(self.num_experts, moe.num_experts)
        count = math.comb(E, n)
        if count > self.max_subsets:
            raise ValueError(f"naee: C({E}, {n}) = {count} subsets exceed max_subsets={self.max_subsets}; "
                             "raise max_subsets or use a scoring method (prune-count, reap)")
        x = x_TD.to(moe.gate.weight.dtype)
        logits, outs = gate.logits(x).double(), expert_outputs(moe.experts, x).double()
        full = routed_output(gate, logits, outs, torch.arange(E))
        best, best_err = None, math.inf
        for subset in itertools.combinations(range(E), n):
            s = torch.tensor(subset)
            err = float((full - routed_output(gate, logits, outs, s)).norm())
            if err < best_err:
                best, best_err = s, err
        return best

    def compress_layer(self, moe: MoE, stats: ExpertStats) -> nn.Module:
        if self.num_experts >= moe.num_experts:
            return moe
        return prune_layer(moe, self.best_subset(moe, stats.inputs))
