"""The GPT's FFN slot: a registry of FFN kinds, so a config names each layer's FFN by string.

A kind is a function ``build(cfg, spec) -> nn.Module`` registered under a name: ``cfg`` is the
model's :class:`~moekit.models.config.GPTConfig` (width, dense ``d_ff``, ``norm_eps``), ``spec`` the
layer's dict from ``GPTConfig.ffn`` (``{"kind": name, ...}``). The module maps ``[B, T, D] ->
[B, T, D]``; if it needs more than the hidden states it says so with a ``context_keys`` tuple
(``token_ids``, ``embeddings``, ``importance``, ``expert_ids``), or its router does. Built in:
``dense`` (SwiGLU FFN), ``moe`` (any registered router; MoE++'s ``zero_experts``, ``copy_experts``,
``constant_experts`` counts), ``pregated`` (Read-ME: an MoE whose
router reads the PreGate's choice) here, and ``mole`` in :mod:`moekit.models.mole`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from moekit.layer import FFN, MoE
from moekit.models.config import GPTConfig
from moekit.registry import Registry
from moekit.routers import build_router

__all__ = ["register_ffn", "build_ffn", "available_ffns"]

Builder = Callable[[GPTConfig, dict], nn.Module]
FFNS: Registry[Builder] = Registry("GPTConfig.ffn", noun="kind")


def register_ffn(kind: str):
    """Function decorator: make ``build(cfg, spec)`` the builder of the FFN kind ``kind``."""
    return FFNS.register(kind)


def available_ffns() -> list[str]:
    return FFNS.names()


def build_ffn(cfg: GPTConfig, spec: dict) -> nn.Module:
    """The FFN module of one layer from its spec (``{"kind": "dense"}`` when the kind is absent)."""
    return FFNS.get(spec.get("kind", "dense"))(cfg, spec)


@register_ffn("dense")
def dense(cfg: GPTConfig, spec: dict) -> nn.Module:
    return FFN(cfg.d_model, spec.get("d_ff", cfg.d_ff), spec.get("activation", "swiglu"))


@register_ffn("moe")
def moe(cfg: GPTConfig, spec: dict) -> nn.Module:
    router = build_router(spec.get("router", "topk"), **spec.get("router_args", {}))
    return MoE(cfg.d_model, spec.get("d_ff", cfg.d_ff), spec.get("num_experts", 8), router=router,
               activation=spec.get("activation", "swiglu"), shared_d_ff=spec.get("shared_d_ff"),
               check_finite=spec.get("check_finite", False), zero_experts=spec.get("zero_experts", 0),
               copy_experts=spec.get("copy_experts", 0), constant_experts=spec.get("constant_experts", 0))


@register_ffn("pregated")
def pregated(cfg: GPTConfig, spec: dict) -> nn.Module:
    """Read-ME's layer: an MoE routed by the model's PreGate (``GPTConfig.pregate`` must be set)."""
    if spec.get("router", "pregate") != "pregate":
        raise ValueError(f"GPTConfig.ffn: a 'pregated' layer is routed by the PreGate, got router {spec['router']!r}")
    return moe(cfg, {**spec, "router": "pregate", "router_args": {}})
