"""Sparse upcycling: every expert starts as a copy of the dense FFN, with a fresh router."""

from __future__ import annotations

import torch
from torch import nn

from moekit.convert.build import bias_flags, empty_moe, moe_from_channels, router_spec
from moekit.convert.ffn import DenseFFN, FFNSite
from moekit.convert.method import ConversionMethod, register_method

__all__ = ["Upcycle", "upcycle"]


@register_method("upcycle")
class Upcycle(ConversionMethod):
    """Sparse upcycling: see :func:`upcycle`."""

    empty_layer = staticmethod(empty_moe)

    def __init__(self, num_experts: int, k: int = 2, router: str = "topk", router_args: dict | None = None,
                 expert_d_ff: int | None = None) -> None:
        router_args = {"k": k, **(router_args or {})} if router == "topk" else dict(router_args or {})
        self.router, self.router_args = router_spec(router, router_args)
        self.num_experts, self.expert_d_ff = num_experts, expert_d_ff

    def settings(self) -> dict:
        return {"num_experts": self.num_experts, "router": self.router, "router_args": self.router_args,
                "expert_d_ff": self.expert_d_ff}

    def build(self, site: FFNSite, ffn: DenseFFN) -> tuple[nn.Module, dict]:
        num_experts, f = self.num_experts, self.expert_d_ff or ffn.d_ff
        if not 1 <= f <= ffn.d_ff:
            raise ValueError(f"upcycle: expert_d_ff must lie in [1, {ffn.d_ff}], got {f}")
        groups = torch.arange(f).repeat(num_experts, 1)
        spec = {"kind": "moe", "num_experts": num_experts, "d_ff": f, "router": self.router,
                "router_args": self.router_args, "activation": ffn.activation, **bias_flags(ffn)}
        return moe_from_channels(ffn, groups, self.router, self.router_args), spec


def upcycle(model: nn.Module, num_experts: int, k: int = 2, router: str = "topk", router_args: dict | None = None,
            expert_d_ff: int | None = None) -> nn.Module:
    """Sparse upcycling: every expert starts as a copy of the dense FFN (or of its first
    ``expert_d_ff`` channels), with a fresh router (``TopK(k)`` renormalised by default, so the
    upcycled model computes exactly the dense one until the copies are trained apart)."""
    return Upcycle(num_experts, k, router, router_args, expert_d_ff).convert(model)
