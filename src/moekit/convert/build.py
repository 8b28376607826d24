"""Building MoE layers out of a dense FFN's hidden channels.

An expert is a set of the dense FFN's hidden channels: rows of ``gate``/``up`` and the same columns
of ``down``. Partitioning (DSMoE), refactoring (Read-ME) and upcycling differ only in which sets
they take, so they share :func:`moe_from_channels`. The dense down-projection bias is not an
expert's: it is added once, by :class:`ConvertedFFN`, whatever the routing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.convert.ffn import DenseFFN
from moekit.layer import FFN, MoE
from moekit.routers import build_router
from moekit.routing import Router

__all__ = ["moe_from_channels", "dense_from_channels", "ConvertedFFN", "RoutingContext", "context_keys_of",
           "bias_flags", "router_spec", "empty_moe", "empty_dense"]


def _take(ffn: DenseFFN, ch: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(first [.., 2f|f, D], down [D, f], first_bias, None)`` of the channels ``ch`` (gate rows first)."""
    up, gate = ffn.up[ch], None if ffn.gate is None else ffn.gate[ch]
    first = up if gate is None else torch.cat([gate, up], dim=0)
    bias = None
    if ffn.up_bias is not None or ffn.gate_bias is not None:
        ub = ffn.up_bias[ch] if ffn.up_bias is not None else up.new_zeros(len(ch))
        if gate is None:
            bias = ub
        else:
            gb = ffn.gate_bias[ch] if ffn.gate_bias is not None else up.new_zeros(len(ch))
            bias = torch.cat([gb, ub])
    return first, ffn.down[:, ch], bias


def moe_from_channels(ffn: DenseFFN, groups: Tensor, router: Router | str, router_args: dict | None = None,
                      shared: Tensor | None = None, check_finite: bool = False) -> MoE:
    """An MoE whose expert ``e`` holds the hidden channels ``groups[e]`` (``[E, f]`` long) of ``ffn``
    and, if ``shared`` is given, an always-on shared expert with those channels. Biases of ``up``/
    ``gate`` go with their channels; the down bias is left out (see :class:`ConvertedFFN`)."""
    E, f = groups.shape
    bias = ffn.has_bias or ffn.gate_bias is not None
    r = router if isinstance(router, Router) else build_router(router, **(router_args or {}))
    moe = MoE(ffn.d_model, f, E, router=r, activation=ffn.activation,
              shared_d_ff=None if shared is None or len(shared) == 0 else len(shared), bias=bias,
              check_finite=check_finite).to(ffn.up.dtype)
    with torch.no_grad():
        ex = moe.experts
        for e in range(E):
            first, down, fb = _take(ffn, groups[e])
            ex.first_proj[e].copy_(first)
            ex.down_proj[e].copy_(down)
            if fb is not None:
                ex.first_bias[e].copy_(fb)
        if ex.down_proj_bias is not None:
            ex.down_proj_bias.zero_()
        if moe.shared_expert is not None:
            _fill_ffn(moe.shared_expert, ffn, shared)
    return moe


def _fill_ffn(dst: FFN, ffn: DenseFFN, ch: Tensor) -> None:
    with torch.no_grad():
        dst.up_proj.weight.copy_(ffn.up[ch])
        dst.down_proj.weight.copy_(ffn.down[:, ch])
        if ffn.gate is not None:
            dst.gate_proj.weight.copy_(ffn.gate[ch])
        if dst.up_proj.bias is not None:
            dst.up_proj.bias.copy_(ffn.up_bias[ch] if ffn.up_bias is not None else 0)
            dst.down_proj.bias.zero_()
            if ffn.gate is not None:
                dst.gate_proj.bias.copy_(ffn.gate_bias[ch] if ffn.gate_bias is not None else 0)


def dense_from_channels(ffn: DenseFFN, channels: Tensor) -> FFN:
    """A narrower dense moekit ``FFN`` keeping only ``channels`` (structured pruning); no down bias."""
    out = FFN(ffn.d_model, len(channels), ffn.activation, bias=ffn.has_bias or ffn.gate_bias is not None)
    out = out.to(ffn.up.dtype)
    _fill_ffn(out, ffn, channels)
    return out


def bias_flags(ffn: DenseFFN) -> dict:
    """The spec entries that say which biases a converted layer has: ``bias`` (up/gate) and ``out_bias`` (down)."""
    return {"bias": ffn.has_bias or ffn.gate_bias is not None, "out_bias": ffn.down_bias is not None}


def router_spec(router: str | Router, router_args: dict | None) -> tuple[str, dict]:
    """``(name, arguments)`` of a router given by name: what a converted model records to be rebuilt."""
    if isinstance(router, Router):
        raise TypeError("moekit.convert: pass the router by name (e.g. 'sigmoid_ste', 'topk') with router_args, "
                        "so that the converted model can be saved and rebuilt")
    return router, dict(router_args or {})


def empty_moe(spec: dict, d_model: int) -> MoE:
    """The MoE a ``"moe"`` layer spec describes, with fresh weights (loading overwrites them)."""
    return MoE(d_model, spec["d_ff"], spec["num_experts"],
               router=build_router(spec["router"], **spec.get("router_args", {})),
               activation=spec["activation"], shared_d_ff=spec.get("shared_d_ff"), bias=spec.get("bias", False),
               check_finite=False)


def empty_dense(spec: dict, d_model: int) -> FFN:
    """The dense FFN a ``"dense"`` layer spec describes, with fresh weights (loading overwrites them)."""
    return FFN(d_model, spec["d_ff"], spec["activation"], bias=spec.get("bias", False))


class RoutingContext:
    """Per-forward context for converted layers whose router asks for more than the hidden states
    (``context_keys``): Read-ME's pre-gated ``expert_ids``, shared by every layer of a model and set
    by the PreGate before the backbone runs; and a token ``importance`` (DA-MoE), set by
    :func:`moekit.convert.importance.attach_importance` from a layer's attention just before that
    layer's FFN runs, and consumed by it."""

    def __init__(self) -> None:
        self.expert_ids: Tensor | None = None
        self.importance: Tensor | None = None


def context_keys_of(ffn: nn.Module) -> tuple[str, ...]:
    """What a layer asks of the model: its own ``context_keys`` or its router's."""
    return tuple(getattr(ffn, "context_keys", getattr(getattr(ffn, "gate", None), "context_keys", ())))


class ConvertedFFN(nn.Module):
    """What replaces a Hugging Face FFN: an MoE (or a pruned dense FFN) plus the dense model's down
    bias, added once. With a :class:`RoutingContext` the MoE gets what its router asks for from it
    (pre-gated expert ids, attention importance)."""

    def __init__(self, ffn: nn.Module, out_bias: Tensor | None = None, context: RoutingContext | None = None) -> None:
        super().__init__()
        self.ffn = ffn
        self.out_bias = None if out_bias is None else nn.Parameter(out_bias.detach().clone())
        self.context = context

    def _routing_context(self, x: Tensor) -> dict:
        keys, n = context_keys_of(self.ffn), x.shape[:-1].numel()
        if self.context is None:
            if "importance" in keys:
                raise ValueError("ConvertedFFN: this layer's router needs the tokens' importance; attach it with "
                                 "moekit.convert.attach_importance(model, 'received' or 'paid')")
            return {}
        out = {}
        if "importance" in keys:
            imp, self.context.importance = self.context.importance, None  # consumed: never reused by another layer
            if imp is None or imp.numel() != n:
                raise RuntimeError("ConvertedFFN: no attention importance for this input; the layer's attention must "
                                   "run first with moekit.convert.attach_importance attached, one whole sequence at "
                                   "a time")
            out["importance"] = imp.reshape(-1)
        if "expert_ids" in keys:
            ids = self.context.expert_ids
            if ids is None or ids.numel() != n:
                raise RuntimeError(
                    "ConvertedFFN: no pre-gated expert ids for this input; call the model on input_ids with its "
                    "PreGate attached (moekit.convert.refactor), one whole sequence at a time"
                )
            out["expert_ids"] = ids.reshape(-1)
        return out

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.ffn(x, **self._routing_context(x))
        return y if self.out_bias is None else y + self.out_bias
