"""Computing one expert from its weights: a loaded block's parts (float, or quantized: dequantized
as :class:`~moekit.compress.quantized.QuantizedExperts` does), a block streamed from the store, or an
int8 copy.

Every kernel is exact for the weights it is given: an expert is one ``F.linear`` pair on its rows
(equal to the grouped matmul of :class:`~moekit.experts.GroupedExperts` up to float summation order).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.compress.quant import QuantizedTensor, dequantize
from moekit.compress.quantized import expert_ffn
from moekit.experts import Activation
from moekit.offload.store import LayerSpec

__all__ = ["expert_forward", "int8_forward", "streamed_forward"]


def expert_forward(act: Activation, x: Tensor, w: dict[str, Tensor]) -> Tensor:
    """One expert with weights ``w`` (a block's parts, :meth:`LayerSpec.split` or
    :meth:`LayerSpec.split_quant`) on rows ``x``."""
    dt = x.dtype
    if isinstance(w["first"], QuantizedTensor):  # the in-memory QuantizedExperts' computation, exactly
        b1, b2 = (w[k].to(dt) if k in w else None for k in ("first_bias", "down_bias"))
        return expert_ffn(x, dequantize(w["first"], dt), b1, dequantize(w["down"], dt), b2, act)
    h = F.linear(x, w["first"].to(dt), w["first_bias"].to(dt) if "first_bias" in w else None)
    return F.linear(act.apply(h), w["down"].to(dt), w["down_bias"].to(dt) if "down_bias" in w else None)


def streamed_forward(spec: LayerSpec, act: Activation, x: Tensor,
                     chunks: Iterator[tuple[str, int, Tensor]]) -> tuple[Tensor, float]:
    """``(output, seconds spent reading)`` of one expert computed from ``chunks`` (the parts of its
    block as :meth:`~moekit.offload.store.ExpertStore.stream` yields them: first-projection rows,
    biases, down-projection rows), a few rows at a time. Works on transposed activations so every
    chunk's product is written in place into contiguous rows."""
    dt = x.dtype
    x_T = x.T.contiguous()
    h_T = x.new_empty(spec.first_out, x.shape[0])
    y_T = x.new_empty(spec.d_model, x.shape[0])
    a_T = bias = None
    reading = 0.0
    while True:
        t0 = time.perf_counter()
        part, r, w = next(chunks, (None, 0, None))
        reading += time.perf_counter() - t0
        if part is None:
            break
        w = w if w.dtype == dt else w.to(dt)
        if part == "first":
            torch.mm(w, x_T, out=h_T[r: r + w.shape[0]])
        elif part == "bias":  # its own small tensor, not the reused buffer
            h_T += w[: spec.first_out, None]
            bias = w[spec.first_out:, None]
        else:
            if a_T is None:
                a_T = act.apply(h_T.T).T.contiguous()
            torch.mm(w, a_T, out=y_T[r: r + w.shape[0]])
    return (y_T if bias is None else y_T + bias).T, reading


def _int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None, chunk: int) -> Tensor:
    y = x.new_empty(x.shape[0], q.shape[0])
    for i in range(0, q.shape[0], chunk):
        w = q[i: i + chunk].to(x.device, x.dtype) * scale[i: i + chunk, None].to(x.device, x.dtype)
        y[:, i: i + chunk] = x @ w.T
    return y if bias is None else y + bias.to(x.device, x.dtype)


def int8_forward(act: Activation, x: Tensor, p: dict[str, Tensor], chunk: int = 256) -> Tensor:
    """One expert from its int8 copy's parts ``p`` (:meth:`LayerSpec.split_low`), dequantised
    ``chunk`` output rows at a time (a small scratch)."""
    h = _int8_linear(x, p["first"], p["first_scale"], p.get("first_bias"), chunk)
    return _int8_linear(act.apply(h), p["down"], p["down_scale"], p.get("down_bias"), chunk)
