"""DSMoE (and MoEfication, LLaMA-MoE): cut each FFN's hidden channels into experts of equal width.

``FFN(x) = sum_i (act(x W_i) * x U_i) V_i`` over any partition of the hidden channels into sets
``i`` (papers.md §4.2), so with every expert on at weight 1 the MoE computes the dense FFN exactly.
The sets are contiguous blocks (DSMoE) or balanced clusters of channels: by their weights
(MoEfication's parameter clustering) or by co-activation on calibration text (channels that fire
on the same tokens go together); :mod:`moekit.convert.groups` computes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.convert.build import bias_flags, empty_moe, moe_from_channels, router_spec
from moekit.convert.calibration import (
    MIN_CALIBRATION_TOKENS,
    channel_importance,
)
from moekit.convert.ffn import DenseFFN, FFNSite, find_ffns
from moekit.convert.groups import check_divides, cluster_groups, contiguous_groups
from moekit.convert.method import ConversionMethod, register_method
from moekit.layer import FFN, MoE
from moekit.routing import Router

__all__ = ["Partition", "partition", "partition_ffn", "moe_from_ffn", "partition_gpt"]


@register_method("partition")
class Partition(ConversionMethod):
    """DSMoE's conversion: see :func:`partition`."""

    empty_layer = staticmethod(empty_moe)

    def __init__(self, num_experts: int, router: str = "sigmoid_ste", router_args: dict | None = None,
                 grouping: str = "contiguous", features: str = "weights", calibration=None,
                 run: Callable | None = None, seed: int = 0, min_tokens: int = MIN_CALIBRATION_TOKENS,
                 max_samples: int = 2048, progress: bool = False) -> None:
        self.router, self.router_args = router_spec(router, router_args)
        if grouping not in ("contiguous", "cluster"):
            raise ValueError(f"partition: grouping must be 'contiguous' or 'cluster', got {grouping!r}")
        if features not in ("weights", "activations"):
            raise ValueError(f"partition: features must be 'weights' or 'activations', got {features!r}")
        self.num_experts, self.grouping, self.features, self.seed = num_experts, grouping, features, seed
        self.calibration, self.run, self.min_tokens, self.max_samples = calibration, run, min_tokens, max_samples
        self.progress = progress
        self.activations: list[Tensor] | None = None

    def settings(self) -> dict:
        return {"num_experts": self.num_experts, "router": self.router, "router_args": self.router_args,
                "grouping": self.grouping, "features": self.features, "seed": self.seed}

    def prepare(self, model: nn.Module) -> None:
        for s in find_ffns(model):
            check_divides(s.read().d_ff, self.num_experts, "partition")
        if self.grouping == "cluster" and self.features == "activations":
            _, self.activations = channel_importance(model, self.calibration, self.run, self.min_tokens,
                                                     self.max_samples, self.progress)

    def groups(self, site: FFNSite, ffn: DenseFFN) -> Tensor:
        """``[E, d_ff / E]``: the hidden channels of each expert of this FFN."""
        if self.grouping == "contiguous":
            return contiguous_groups(ffn.d_ff, self.num_experts)
        f = self.activations[site.layer] if self.activations is not None else torch.cat(
            [ffn.up, *([ffn.gate] if ffn.gate is not None else []), ffn.down.T], dim=1)
        return cluster_groups(f, self.num_experts, seed=self.seed)

    def build(self, site: FFNSite, ffn: DenseFFN) -> tuple[nn.Module, dict]:
        groups = self.groups(site, ffn)
        spec = {"kind": "moe", "num_experts": self.num_experts, "d_ff": ffn.d_ff // self.num_experts,
                "router": self.router, "router_args": self.router_args, "activation": ffn.activation,
                **bias_flags(ffn), "groups": groups.tolist()}
        return moe_from_channels(ffn, groups, self.router, self.router_args), spec


def partition(model: nn.Module, num_experts: int, router: str = "sigmoid_ste", router_args: dict | None = None,
              grouping: str = "contiguous", features: str = "weights", calibration=None, run: Callable | None = None,
              seed: int = 0, min_tokens: int = MIN_CALIBRATION_TOKENS, max_samples: int = 2048,
              progress: bool = False) -> nn.Module:
    """DSMoE: cut every FFN's hidden channels into ``num_experts`` experts of equal width.

    ``grouping="contiguous"`` takes blocks (the paper); ``"cluster"`` takes balanced clusters of
    channels by ``features="weights"`` (each channel's ``gate``/``up`` rows and ``down`` column) or
    ``"activations"`` (co-activation: ``|h|`` over up to ``max_samples`` calibration tokens). The
    default router is DSMoE's sigmoid gate with threshold and straight-through estimator
    (``SigmoidSTE``; fine-tune with its sparsity loss); any registered router name works.
    With every expert on at weight 1 the result equals the dense model.
    """
    return Partition(num_experts, router, router_args, grouping, features, calibration, run, seed, min_tokens,
                     max_samples, progress).convert(model)


# ----------------------------------------------------------------------------------- moekit FFN helpers


def partition_ffn(ffn: FFN, num_experts: int):
    """``GroupedExperts`` holding the ``num_experts`` contiguous blocks of a moekit ``FFN``'s hidden units."""
    return moe_from_ffn(ffn, num_experts, "softmax").experts


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _dense_of(ffn: FFN) -> DenseFFN:
    if not isinstance(ffn, FFN):
        raise TypeError(f"partition_ffn: expected a moekit FFN, got {type(ffn).__name__}")
    g = ffn.gate_proj if ffn.act.gated else None
    return DenseFFN(up=ffn.up_proj.weight.detach(), down=ffn.down_proj.weight.detach(), activation=ffn.activation,
                    gate=None if g is None else g.weight.detach(), up_bias=_detached(ffn.up_proj.bias),
                    gate_bias=None if g is None else _detached(g.bias), down_bias=_detached(ffn.down_proj.bias))


def moe_from_ffn(ffn: FFN, num_experts: int, router: Router | str) -> MoE:
    """An MoE whose experts are the contiguous blocks of ``ffn`` (a fresh router decides which run)."""
    dense = _dense_of(ffn)
    if dense.down_bias is not None:
        raise ValueError("moe_from_ffn: FFNs with a down bias need moekit.convert.partition (ConvertedFFN adds it)")
    check_divides(dense.d_ff, num_experts, "partition_ffn")
    return moe_from_channels(dense, contiguous_groups(dense.d_ff, num_experts), router)


def partition_gpt(model, num_experts: int, router: str, router_args: dict | None = None):
    """A copy of a dense ``moekit.models.GPT`` whose every FFN is cut into ``num_experts`` blocks."""
    if any(not isinstance(b.ffn, FFN) for b in model.blocks):
        raise ValueError("partition_gpt: every layer of the model must have a dense FFN")
    return partition(model, num_experts, router, router_args)
