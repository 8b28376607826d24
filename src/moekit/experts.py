"""Grouped FFN experts with 3D weights ``[E, out, in]`` and a registry of compute backends.

The layer picks the fastest backend that supports the call (device, dtype, alignment) by
itself; callers may force one (``backend=``) for tests and benchmarks.

Backends (each computes the whole expert FFN on expert-sorted rows):
    ``loop``        a segment loop: per expert, both matmuls on its contiguous rows, written into
                    preallocated buffers, with a hand-written backward that fills ``[E, out, in]``
                    weight gradients per expert (never autograd through ``w[e]``: that backward is
                    O(E^2)). Any dtype, any device, any width.
    ``grouped_mm``  ``torch._grouped_mm`` for both projections (torch >= 2.9; fp32/bf16; 16-byte
                    aligned widths); chosen first wherever it runs. Its split sizes stay on the
                    device, so under ``torch.compile`` it runs inside the graph (as the custom op
                    ``moekit::grouped_mm``); the loop runs eagerly between two graphs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.dispatch import Segments

__all__ = ["GroupedExperts", "experts_on_meta", "ACTIVATIONS", "register_backend", "available_backends", "select_backend"]


# ----------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activation:
    fn: Callable[[Tensor], Tensor]
    fn_backward: Callable[[Tensor, Tensor], Tensor]  # (grad of fn's output, fn's input) -> grad of input
    gated: bool  # gated (GLU) FFNs project to 2F and compute fn(gate) * up

    def apply(self, h: Tensor) -> Tensor:
        """``fn(gate) * up`` for gated activations (``h = [gate | up]``), else ``fn(h)``."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fn(gate) * up
        return self.fn(h)

    def backward(self, h: Tensor, grad_a: Tensor) -> Tensor:
        """Gradient of :meth:`apply` at ``h`` given the gradient of its output (torch's fused kernels)."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return torch.cat([self.fn_backward(grad_a * up, gate), grad_a * self.fn(gate)], dim=-1)
        return self.fn_backward(grad_a, h)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_aten = torch.ops.aten
ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(F.silu, _aten.silu_backward, True),
    "geglu": Activation(F.gelu, _aten.gelu_backward, True),
    "gelu": Activation(F.gelu, _aten.gelu_backward, False),
    "gelu_tanh": Activation(_gelu_tanh, lambda g, x: _aten.gelu_backward(g, x, approximate="tanh"), False),
    "relu": Activation(F.relu, lambda g, x: _aten.threshold_backward(g, x, 0), False),
    "silu": Activation(F.silu, _aten.silu_backward, False),
}


def get_activation(name: str) -> Activation:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown value {name!r}; valid values are {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------- backends

ExpertsFn = Callable[[Tensor, "GroupedExperts", Segments], Tensor]


@dataclass
class Backend:
    name: str
    fn: ExpertsFn  # (x_ND sorted by expert, experts module, segments) -> y_ND
    supports: Callable[[Tensor, GroupedExperts], bool]


_BACKENDS: dict[str, Backend] = {}  # in order of preference: the first able one runs


def register_backend(name: str, fn: ExpertsFn, supports: Callable[[Tensor, GroupedExperts], bool],
                     first: bool = False) -> None:
    """Register an expert backend; ``supports(x, experts)`` says whether it can run a call.

    ``first=True`` puts it ahead of the existing ones in the automatic choice.
    """
    _BACKENDS.pop(name, None)
    if first:
        rest = dict(_BACKENDS)
        _BACKENDS.clear()
        _BACKENDS[name] = Backend(name, fn, supports)
        _BACKENDS.update(rest)
    else:
        _BACKENDS[name] = Backend(name, fn, supports)


def available_backends() -> list[str]:
    return list(_BACKENDS)


def select_backend(x: Tensor, experts: GroupedExperts, preferred: str | None = None) -> Backend:
    """``preferred`` if given and able to run this call, else the first able backend in preference order."""
    if preferred is not None:
        if preferred not in _BACKENDS:
            raise ValueError(f"backend: unknown value {preferred!r}; valid values are {available_backends()}")
        b = _BACKENDS[preferred]
        if not b.supports(x, experts):
            raise ValueError(
                f"backend: {preferred!r} cannot run dtype={x.dtype}, device={x.device.type}, "
                f"d_model={experts.d_model}, d_ff={experts.d_ff}; use backend=None to choose automatically"
            )
        return b
    for b in _BACKENDS.values():
        if b.supports(x, experts):
            return b
    raise RuntimeError(f"no expert backend supports dtype={x.dtype} on {x.device}")  # "loop" supports all


# --- segment loop: one fused FFN per expert over its contiguous rows, written in place


def _mm_into(out: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _segments(sizes) -> list[tuple[int, slice]]:
    """``(expert, rows)`` for each expert that has rows."""
    out, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append((e, slice(start, start + n)))
            start += n
    return out


class _SegmentLoopFFN(torch.autograd.Function):
    """``y[rows_e] = down_e(act(first_e(x[rows_e])))`` for each expert ``e``, with a hand-written backward.

    Matmuls run per expert on its contiguous rows and write into preallocated buffers (nothing to
    concatenate); elementwise work runs once over all rows; weight gradients are ``[E, out, in]``
    buffers filled per expert (no O(E^2) ``W[e]`` backward). Without autograd, each expert's
    hidden state stays in cache between its two matmuls.
    """

    @staticmethod
    def forward(ctx, x_ND, w1, b1, w2, b2, sizes, act):
        segs = _segments(sizes)
        out = x_ND.new_empty(x_ND.shape[0], w2.shape[1])
        need_grad = any(ctx.needs_input_grad[:5])
        if not need_grad:
            for e, rows in segs:
                h = torch.mm(x_ND[rows], w1[e].t()) if b1 is None else torch.addmm(b1[e], x_ND[rows], w1[e].t())
                _mm_into(out[rows], act.apply(h), w2[e].t(), None if b2 is None else b2[e])
            return out
        h_NH = x_ND.new_empty(x_ND.shape[0], w1.shape[1])
        for e, rows in segs:
            _mm_into(h_NH[rows], x_ND[rows], w1[e].t(), None if b1 is None else b1[e])
        a_NF = act.apply(h_NH)
        for e, rows in segs:
            _mm_into(out[rows], a_NF[rows], w2[e].t(), None if b2 is None else b2[e])
        ctx.segs, ctx.act = segs, act
        ctx.save_for_backward(x_ND, w1, w2, h_NH, a_NF)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x_ND, w1, w2, h_NH, a_NF = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        g_ND = grad_out.contiguous()
        segs = ctx.segs
        da_NF = h_NH.new_empty(h_NH.shape[0], w2.shape[2])
        for e, rows in segs:
            torch.mm(g_ND[rows], w2[e], out=da_NF[rows])
        dh_NH = ctx.act.backward(h_NH, da_NF)
        dx = torch.empty_like(x_ND) if need_x else None
        dw1 = w1.new_zeros(w1.shape) if need_w1 and len(segs) < w1.shape[0] else torch.empty_like(w1) if need_w1 else None
        dw2 = w2.new_zeros(w2.shape) if need_w2 and len(segs) < w2.shape[0] else torch.empty_like(w2) if need_w2 else None
        db1 = w1.new_zeros(w1.shape[:2]) if need_b1 else None
        db2 = w2.new_zeros(w2.shape[:2]) if need_b2 else None
        for e, rows in segs:
            if dw2 is not None:
                torch.mm(g_ND[rows].t(), a_NF[rows], out=dw2[e])
            if db2 is not None:
                db2[e] = g_ND[rows].sum(0)
            if dw1 is not None:
                torch.mm(dh_NH[rows].t(), x_ND[rows], out=dw1[e])
            if db1 is not None:
                db1[e] = dh_NH[rows].sum(0)
            if dx is not None:
                torch.mm(dh_NH[rows], w1[e], out=dx[rows])
        return dx, dw1, db1, dw2, db2, None, None


@torch.compiler.disable
def _loop_experts(x_ND: Tensor, experts: GroupedExperts, seg: Segments) -> Tensor:
    """The segment loop; its per-expert slices need the sizes on the host, so under torch.compile it
    runs eagerly between two graphs (the layer's one graph break)."""
    return _SegmentLoopFFN.apply(
        x_ND.contiguous(), experts.first_proj, experts.first_bias, experts.down_proj, experts.down_proj_bias,
        tuple(seg.sizes), experts.act,
    )


# --- torch._grouped_mm: two grouped GEMMs with the activation between them
#
# Under torch.compile the GEMMs run as the custom ops ``moekit::grouped_mm`` and
# ``moekit::grouped_mm_wgrad`` (its weight gradient): aten._grouped_mm's meta function accepts
# bf16 only, these ops' fake functions any dtype, and their backward is registered here. They take
# the weights in the parameters' own ``[E, O, I]`` layout, which the compiler passes as they are
# (a transposed view would be copied to contiguous memory at every call). Eagerly the aten op runs
# directly (a custom op costs ~10 us of dispatch per call).


@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offs: Tensor, transpose_w: bool) -> Tensor:
    """Rows ``[offs[g-1], offs[g])`` of ``x [N, I]`` times ``w[g]^T`` (``w [E, O, I]``, ``transpose_w``)
    or ``w[g]`` (``w [E, I, O]``): ``[N, O]``."""
    return torch._grouped_mm(x.contiguous(), w.transpose(-2, -1) if transpose_w else w, offs=offs)


@grouped_mm.register_fake
def _grouped_mm_fake(x: Tensor, w: Tensor, offs: Tensor, transpose_w: bool) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-2] if transpose_w else w.shape[-1])


@torch.library.custom_op("moekit::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """``[E, P, Q]``: per row group g of ``a [N, P]`` and ``b [N, Q]``, ``a_g^T @ b_g`` (zero if empty)."""
    return torch._grouped_mm(a.contiguous().t(), b.contiguous(), offs=offs)


@grouped_mm_wgrad.register_fake
def _grouped_mm_wgrad_fake(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x, w, offs, ctx.transpose_w = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_backward(ctx, g: Tensor):
    x, w, offs = ctx.saved_tensors
    g = g.contiguous()  # the aten op rejects zero-stride (expanded) gradients
    dx = grouped_mm(g, w, offs, not ctx.transpose_w) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[1]:  # y_g = x_g w_g^T: dw_g = g_g^T x_g; y_g = x_g w_g: dw_g = x_g^T g_g
        dw = grouped_mm_wgrad(g, x, offs) if ctx.transpose_w else grouped_mm_wgrad(x, g, offs)
    return dx, dw, None, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _contiguous_grad(g: Tensor) -> Tensor:
    return g.contiguous()


def _grouped_linear(x_ND: Tensor, w_EOI: Tensor, b_EO: Tensor | None, seg: Segments, rows_N: Tensor | None) -> Tensor:
    if torch.compiler.is_compiling():
        y = grouped_mm(x_ND, w_EOI, seg.ends, True)
    else:
        y = torch._grouped_mm(x_ND.contiguous(), w_EOI.transpose(-2, -1), offs=seg.ends)
        if y.requires_grad:  # the op's backward rejects zero-stride (expanded) incoming gradients
            y.register_hook(_contiguous_grad)
    return y if b_EO is None else y + b_EO.index_select(0, rows_N)


def _grouped_mm_experts(x_ND: Tensor, experts: GroupedExperts, seg: Segments) -> Tensor:
    if x_ND.shape[0] == 0:  # an empty [0, D] on the autograd graph of the input and of the weights: idle
        # experts get a zero gradient, and an expert-parallel backward reaches every rank's all-to-all
        zero = sum(p.sum() for p in experts.parameters()) * 0
        return x_ND @ experts.down_proj.new_zeros(experts.d_model, experts.d_model) + zero
    rows_N = seg.expert_of_row(x_ND.shape[0]) if experts.down_proj_bias is not None else None
    h = _grouped_linear(x_ND, experts.first_proj, experts.first_bias, seg, rows_N)
    return _grouped_linear(experts.act.apply(h), experts.down_proj, experts.down_proj_bias, seg, rows_N)


_GMM_PROBED: dict[tuple[str, torch.dtype], bool] = {}


@torch.compiler.assume_constant_result  # torch.compile runs the probe eagerly, never inside a graph
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward here (probed once per device type and dtype)."""
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


def _grouped_mm_supports(x: Tensor, experts: GroupedExperts) -> bool:
    if x.dtype not in (torch.float32, torch.bfloat16) or experts.down_proj.dtype != x.dtype:
        return False
    es = x.element_size()
    widths = (experts.d_model, experts.d_ff, experts.first_proj.shape[1])
    if any((w * es) % 16 for w in widths):  # 16-byte aligned strides
        return False
    return _grouped_mm_runs(x.device, x.dtype)


# grouped_mm first: on CPU it matches the loop at E=8 and is faster at E=64 (`moekit bench layer`),
# and it is the fast path on CUDA; the loop runs everything else (fp64/fp16, odd widths, old torch).
register_backend("grouped_mm", _grouped_mm_experts, _grouped_mm_supports)
register_backend("loop", _loop_experts, lambda x, experts: True)


# ----------------------------------------------------------------------------------- module

_EXPERTS_ON_META = False


@contextmanager
def experts_on_meta():
    """Build :class:`GroupedExperts` without memory: their weights on the meta device, uninitialised.
    For models whose experts are served from elsewhere (:func:`moekit.offload.load_offloaded`)."""
    global _EXPERTS_ON_META
    was, _EXPERTS_ON_META = _EXPERTS_ON_META, True
    try:
        yield
    finally:
        _EXPERTS_ON_META = was


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
        dev = "meta" if _EXPERTS_ON_META else None
        self.register_parameter(first, nn.Parameter(torch.empty(num_experts, first_out, d_model, device=dev)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff, device=dev))
        if bias:
            self.register_parameter(first + "_bias", nn.Parameter(torch.zeros(num_experts, first_out, device=dev)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, d_model, device=dev))
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
        if self.down_proj.is_meta:
            return
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

    def forward(self, x_ND: Tensor, seg: Segments) -> Tensor:
        """Apply expert ``e`` to its segment of the expert-sorted rows ``x_ND``."""
        return select_backend(x_ND, self, self.backend).fn(x_ND, self, seg)
