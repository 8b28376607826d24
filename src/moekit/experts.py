"""Grouped FFN experts with 3D weights ``[E, out, in]`` and a registry of compute backends.

A backend computes one *grouped linear*: rows ``x[N, in]`` sorted by expert, weights
``w[E, out, in]``, segment sizes -> ``y[N, out]``. The layer picks the fastest backend that
supports the call (device, dtype, alignment); callers may force one for tests and benchmarks.

Backends:
    ``grouped_mm``  ``torch._grouped_mm`` (torch >= 2.9; fp32/bf16; 16-byte aligned strides).
    ``loop``        one ``F.linear`` per non-empty expert over ``w.unbind(0)``; runs everywhere,
                    any dtype. Never ``w[e]`` in a loop: its backward is O(E^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import Segments

__all__ = ["GroupedExperts", "ACTIVATIONS", "register_backend", "available_backends", "select_backend"]


# ----------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activation:
    fn: Callable[[Tensor], Tensor]
    gated: bool  # gated (GLU) FFNs project to 2F and compute fn(gate) * up


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(F.silu, True),
    "geglu": Activation(F.gelu, True),
    "gelu": Activation(F.gelu, False),
    "gelu_tanh": Activation(_gelu_tanh, False),
    "relu": Activation(F.relu, False),
    "silu": Activation(F.silu, False),
}


def get_activation(name: str) -> Activation:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown value {name!r}; valid values are {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------- backends

GroupedLinear = Callable[[Tensor, Tensor, Segments], Tensor]


@dataclass
class Backend:
    name: str
    fn: GroupedLinear
    supports: Callable[[Tensor, Tensor], bool]


_BACKENDS: dict[str, Backend] = {}
# Preference order per device type, fastest first (see benchmarks/ and `moekit bench layer`).
_PREFERENCE: dict[str, list[str]] = {"cuda": ["grouped_mm", "loop"], "default": ["loop", "grouped_mm"]}


def register_backend(name: str, fn: GroupedLinear, supports: Callable[[Tensor, Tensor], bool]) -> None:
    """Register a grouped-linear backend; ``supports(x, w)`` says whether it can run a call."""
    _BACKENDS[name] = Backend(name, fn, supports)
    for order in _PREFERENCE.values():
        if name not in order:
            order.append(name)


def available_backends() -> list[str]:
    return list(_BACKENDS)


def select_backend(x: Tensor, w: Tensor, preferred: str | None = None) -> Backend:
    """The backend to use for ``x @ w[e].T``: ``preferred`` if given and able, else the best able one."""
    if preferred is not None:
        if preferred not in _BACKENDS:
            raise ValueError(f"backend: unknown value {preferred!r}; valid values are {available_backends()}")
        b = _BACKENDS[preferred]
        if not b.supports(x, w):
            raise ValueError(
                f"backend: {preferred!r} cannot run dtype={x.dtype}, device={x.device.type}, "
                f"in={w.shape[-1]}, out={w.shape[-2]}; use backend=None to choose automatically"
            )
        return b
    order = _PREFERENCE.get(x.device.type, _PREFERENCE["default"])
    for name in order:
        b = _BACKENDS[name]
        if b.supports(x, w):
            return b
    raise RuntimeError(f"no expert backend supports dtype={x.dtype} on {x.device}")  # loop supports all


def _empty_linear(x_ND: Tensor, w_EOI: Tensor) -> Tensor:
    """``[0, out]`` that stays on the autograd graph (like a dense layer's output on an empty batch)."""
    return x_ND @ w_EOI[0].t() if w_EOI.shape[0] else x_ND.new_zeros(0, w_EOI.shape[1])


def _loop_linear(x_ND: Tensor, w_EOI: Tensor, seg: Segments) -> Tensor:
    if x_ND.shape[0] == 0:
        return _empty_linear(x_ND, w_EOI)
    outs = [
        F.linear(x_nI, w_OI)
        for x_nI, w_OI, n in zip(x_ND.split(seg.sizes), w_EOI.unbind(0), seg.sizes, strict=True)
        if n
    ]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _contiguous_grad(g: Tensor) -> Tensor:
    return g.contiguous()


def _grouped_mm_linear(x_ND: Tensor, w_EOI: Tensor, seg: Segments) -> Tensor:
    if x_ND.shape[0] == 0:
        return _empty_linear(x_ND, w_EOI)
    y = torch._grouped_mm(x_ND.contiguous(), w_EOI.transpose(-2, -1), offs=seg.ends)
    if y.requires_grad:  # the op's backward rejects zero-stride (expanded) incoming gradients
        y.register_hook(_contiguous_grad)
    return y


_GMM_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _GMM_PROBED:
        ok = False
        if hasattr(torch, "_grouped_mm"):
            try:
                with torch.enable_grad():
                    x = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
                    w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
                    offs = torch.tensor([4, 8], device=device, dtype=torch.int32)
                    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
                    y.backward(torch.ones_like(y))
                ok = bool(torch.allclose(y.detach().float(), torch.full(y.shape, 16.0, device=device)))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GMM_PROBED[key] = ok
    return _GMM_PROBED[key]


def _grouped_mm_supports(x: Tensor, w: Tensor) -> bool:
    if x.dtype not in (torch.float32, torch.bfloat16) or w.dtype != x.dtype:
        return False
    es = x.element_size()
    if (w.shape[-1] * es) % 16 or (w.shape[-2] * es) % 16 or not w.is_contiguous():
        return False
    return _grouped_mm_runs(x.device, x.dtype)


register_backend("loop", _loop_linear, lambda x, w: True)
register_backend("grouped_mm", _grouped_mm_linear, _grouped_mm_supports)


# ----------------------------------------------------------------------------------- module


class GroupedExperts(nn.Module):
    """``E`` independent FFNs, weights stored as 3D tensors (the Hugging Face v5 layout).

    Gated activations (``swiglu``, ``geglu``): ``gate_up_proj [E, 2F, D]`` (gate rows first, then
    up), ``down_proj [E, D, F]``. Plain activations (``gelu``, ``relu``...): ``up_proj [E, F, D]``,
    ``down_proj [E, D, F]``. With ``bias=True``: ``*_bias [E, out]``.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "swiglu",
        bias: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.act = get_activation(activation)
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"backend: unknown value {backend!r}; valid values are {available_backends()}")
        self.backend = backend
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        first = "gate_up_proj" if self.act.gated else "up_proj"
        first_out = 2 * d_ff if self.act.gated else d_ff
        self._first = first
        self.register_parameter(first, nn.Parameter(torch.empty(num_experts, first_out, d_model)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        if bias:
            self.register_parameter(first + "_bias", nn.Parameter(torch.zeros(num_experts, first_out)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, d_model))
        else:
            self.register_parameter(first + "_bias", None)
            self.down_proj_bias = None
        self.reset_parameters()

    @property
    def first_proj(self) -> Tensor:
        return getattr(self, self._first)

    @property
    def first_bias(self) -> Tensor | None:
        return getattr(self, self._first + "_bias")

    def reset_parameters(self) -> None:
        """Per-expert ``nn.Linear`` default init: U(-1/sqrt(in), 1/sqrt(in))."""
        for w in (self.first_proj, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        for b in (self.first_bias, self.down_proj_bias):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, bias={self.down_proj_bias is not None}, backend={self.backend}"
        )

    def _linear(self, x_ND: Tensor, w_EOI: Tensor, b_EO: Tensor | None, seg: Segments, rows_N) -> Tensor:
        y = select_backend(x_ND, w_EOI, self.backend).fn(x_ND, w_EOI, seg)
        return y if b_EO is None else y + b_EO.index_select(0, rows_N)

    def forward(self, x_ND: Tensor, seg: Segments) -> Tensor:
        """Apply expert ``e`` to its segment of the expert-sorted rows ``x_ND``."""
        rows_N = seg.expert_of_row() if self.down_proj_bias is not None else None
        h = self._linear(x_ND, self.first_proj, self.first_bias, seg, rows_N)
        if self.act.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act.fn(gate) * up
        else:
            h = self.act.fn(h)
        return self._linear(h, self.down_proj, self.down_proj_bias, seg, rows_N)
