"""Experts stored at a bit width of their own: a drop-in for :class:`moekit.experts.GroupedExperts`
(same ``experts(x_ND, segments)`` call) whose matrices are packed by :mod:`moekit.compress.quant` and
dequantized per expert, on the fly, when that expert has rows to compute; and
:class:`QuantizedLinear`, the same storage for one ``nn.Linear`` (MC-MoE's 4-bit attention). Each matrix
is packed by round-to-nearest or, given the Hessian of its inputs, by GPTQ (:mod:`moekit.compress.gptq`).

Scales and zeros are fp16 kept bit for bit in int16 buffers (biases: fp32 in int32 buffers), so the
layers hold no floating-point tensor: ``model.to(dtype)`` leaves the stored bytes alone and they
compute in the dtype of their input (as offloaded experts do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moekit.compress.gptq import gptq
from moekit.compress.quant import BITS, QuantizedTensor, check_layout, dequantize, quantize
from moekit.dispatch import Segments
from moekit.experts import GroupedExperts, get_activation

__all__ = ["QuantizedExperts", "QuantizedLinear", "expert_ffn"]


def expert_ffn(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, act) -> Tensor:
    """One expert FFN on rows ``x [n, D]``: ``act(x w1^T + b1) w2^T + b2`` (``act`` an experts activation)."""
    h = x @ w1.t() if b1 is None else torch.addmm(b1, x, w1.t())
    a = act.apply(h)
    return a @ w2.t() if b2 is None else torch.addmm(b2, a, w2.t())


class _Packed(nn.Module):
    """Packed matrices by name (``{name}_codes``, ``_scale``, ``_zero`` buffers) and optional biases."""

    def __init__(self, bits: int, group: int, shapes: dict[str, tuple[int, int]], bias: bool) -> None:
        super().__init__()
        self.bits, self.group, self.shapes = bits, group, shapes
        for name, (o, i) in self.shapes.items():
            self.register_buffer(f"{name}_codes", torch.zeros(math.ceil(o * i * bits / 8), dtype=torch.uint8))
            self.register_buffer(f"{name}_scale", torch.zeros(o, i // group, dtype=torch.int16))
            zero = torch.zeros(o, i // group, dtype=torch.int16) if bits > 1 else None
            self.register_buffer(f"{name}_zero", zero)
            self.register_buffer(f"{name}_bias", torch.zeros(o, dtype=torch.int32) if bias else None)

    def fill(self, name: str, q: QuantizedTensor, bias: Tensor | None) -> None:
        getattr(self, f"{name}_codes").copy_(q.codes)
        getattr(self, f"{name}_scale").copy_(q.scale.view(torch.int16))
        if q.zero is not None:
            getattr(self, f"{name}_zero").copy_(q.zero.view(torch.int16))
        if bias is not None:
            getattr(self, f"{name}_bias").copy_(bias.detach().float().view(torch.int32))

    def quantized(self, name: str) -> QuantizedTensor:
        zero = getattr(self, f"{name}_zero")
        return QuantizedTensor(getattr(self, f"{name}_codes"), getattr(self, f"{name}_scale").view(torch.float16),
                               None if zero is None else zero.view(torch.float16), self.bits, self.group,
                               self.shapes[name])

    def bias(self, name: str, dtype: torch.dtype) -> Tensor | None:
        b = getattr(self, f"{name}_bias")
        return None if b is None else b.view(torch.float32).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, fp16 scales and zeros, fp32 biases."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


def _packed(w: Tensor, bits: int, group: int, hessian: Tensor | None, damp: float) -> QuantizedTensor:
    """``w`` quantized by round-to-nearest, or by GPTQ for inputs of Hessian ``hessian``."""
    return quantize(w, bits, group) if hessian is None else gptq(w, hessian, bits, group, damp)


class _Expert(_Packed):
    """One expert's packed matrices (``first``: gate_up or up, ``down``) and optional biases."""

    def __init__(self, bits: int, group: int, first_shape: tuple[int, int], down_shape: tuple[int, int],
                 bias: bool) -> None:
        super().__init__(bits, group, {"first": first_shape, "down": down_shape}, bias)

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(w1, b1, w2, b2)`` dequantized to ``dtype``."""
        out = []
        for name in ("first", "down"):
            out += [dequantize(self.quantized(name), dtype), self.bias(name, dtype)]
        return tuple(out)


class QuantizedLinear(_Packed):
    """A drop-in for ``nn.Linear(in_features, out_features, bias)`` whose weight is packed at ``bits`` with
    groups of ``group`` input columns (buffers ``weight_codes``, ``weight_scale``, ``weight_zero``,
    ``weight_bias``) and dequantized to the input's dtype at each call.

    Build one from a trained layer with :meth:`from_linear`; the constructor makes an empty one (to
    load a ``state_dict`` into).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group: int = 64, bias: bool = False) -> None:
        check_layout((out_features, in_features), bits, group)
        super().__init__(int(bits), group, {"weight": (out_features, in_features)}, bias)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int = 64, hessian: Tensor | None = None,
                    damp: float = 0.01) -> QuantizedLinear:
        """``linear`` quantized by round-to-nearest, or by GPTQ when the Hessian of its inputs is given
        (:func:`moekit.compress.gptq.hessian`)."""
        out = cls(linear.in_features, linear.out_features, bits, group, linear.bias is not None)
        out.fill("weight", _packed(linear.weight, out.bits, group, hessian, damp), linear.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group}, bias={self.weight_bias is not None}")

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, dequantize(self.quantized("weight"), x.dtype), self.bias("weight", x.dtype))


class QuantizedExperts(nn.Module):
    """``E`` FFN experts, expert ``e`` packed at ``bits[e]`` with groups of ``group`` input columns.

    Build one from trained experts with :meth:`from_experts`; the constructor makes an empty one of
    the same layout (to load a ``state_dict`` into).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, bits: Sequence[int], group: int = 64,
                 activation: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        bits = [int(b) for b in bits]
        if len(bits) != num_experts or any(b not in BITS for b in bits):
            raise ValueError(f"QuantizedExperts: bits must give one of {BITS} for each of the {num_experts} experts, "
                             f"got {bits}")
        for width in (d_model, d_ff):
            if width % group:
                raise ValueError(f"QuantizedExperts: group={group} must divide d_model={d_model} and d_ff={d_ff}")
        self.num_experts, self.d_model, self.d_ff, self.group = num_experts, d_model, d_ff, group
        self.activation, self.act, self.bits = activation, get_activation(activation), bits
        first = ((2 if self.act.gated else 1) * d_ff, d_model)
        self.experts = nn.ModuleList(_Expert(b, group, first, (d_model, d_ff), bias) for b in bits)

    @classmethod
    def from_experts(cls, experts: GroupedExperts, bits: Sequence[int], group: int = 64,
                     hessians: Sequence[tuple[Tensor, Tensor] | None] | None = None,
                     damp: float = 0.01) -> QuantizedExperts:
        """``experts``' weights, expert ``e`` quantized to ``bits[e]``: by round-to-nearest, or by GPTQ
        (:func:`moekit.compress.gptq.gptq`) where ``hessians[e]`` gives the Hessians of the inputs of its
        first and down projections (``None``: that expert stays round-to-nearest)."""
        bias = experts.down_proj_bias is not None
        out = cls(experts.num_experts, experts.d_model, experts.d_ff, bits, group, experts.activation, bias)
        if hessians is not None and len(hessians) != experts.num_experts:
            raise ValueError(f"QuantizedExperts: hessians must give a pair (or None) for each of the "
                             f"{experts.num_experts} experts, got {len(hessians)}")
        for e, ex in enumerate(out.experts):
            hs = (None, None) if hessians is None or hessians[e] is None else hessians[e]
            for name, w, b, h in (("first", experts.first_proj, experts.first_bias, hs[0]),
                                  ("down", experts.down_proj, experts.down_proj_bias, hs[1])):
                ex.fill(name, _packed(w[e], ex.bits, group, h, damp), None if b is None else b[e])
        return out

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, fp16 scales and zeros, fp32 biases."""
        return sum(ex.nbytes for ex in self.experts)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, bits={self.bits}, "
                f"group={self.group}, activation={self.activation!r}")

    def forward(self, x_ND: Tensor, seg: Segments) -> Tensor:
        """Apply expert ``e`` (dequantized now) to its segment of the expert-sorted rows ``x_ND``."""
        out = x_ND.new_empty(x_ND.shape[0], self.d_model)
        start = 0
        for e, n in enumerate(seg.sizes):
            if n:
                out[start:start + n] = expert_ffn(x_ND[start:start + n], *self.experts[e].weights(x_ND.dtype),
                                                  self.act)
                start += n
        return out
