"""GPTQ (Frantar et al., ICLR 2023): quantization of a linear layer's weight that minimises the change
of its output on calibration inputs, into the packed group-wise format of :mod:`moekit.compress.quant`.

For a weight ``W [O, I]`` and the Hessian ``H = 2 X^T X / n`` of the layer's inputs ``X [n, I]``
(:func:`hessian`), the columns are quantized one after another; each column's rounding error is
spread over the columns not yet quantized so that ``||X W^T - X W_q^T||`` stays small (the OBQ update
``delta = -(w_q - q) / [H^-1]_qq * [H^-1]_{q,:}``). As in the reference implementation:

- dead inputs (``H_jj = 0``) get ``H_jj = 1`` and a zero weight column;
- ``H`` is dampened by ``damp * mean(diag H)`` on its diagonal;
- the successive ``H^-1`` of the remaining columns are the rows of the upper Cholesky factor ``U`` of
  ``H^-1`` (``U^T U = H^-1``);
- the updates are applied lazily: inside a block of ``block`` columns at once, to the later columns
  once per block;
- a group's fp16 scale and zero (the grid of :func:`moekit.compress.quant.quantize`, 1 bit included)
  are computed from the group's current, already updated weights when its first column is reached;
- ``act_order``: the columns are taken in decreasing ``diag H`` order; the groups stay groups of
  consecutive input columns (the packed format), each gets its grid when the first of its columns is
  quantized.

With ``H`` a multiple of the identity no error is spread and GPTQ is round-to-nearest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.compress.quant import QuantizedTensor, check_layout, grid_codes, grid_values, group_grid, pack_bits

__all__ = ["gptq", "hessian"]


def hessian(x: Tensor) -> Tensor:
    """``H = 2 X^T X / n`` (float64) of a layer's inputs ``x [..., I]`` (all leading dims are rows)."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    return 2 * x.t() @ x / max(x.shape[0], 1)


def _inverse_factor(H: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of ``(H + damp mean(diag H) I)^-1``."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        raise ValueError(f"gptq: the dampened Hessian is not positive definite (damp={damp}); raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _current(W: Tensor, err: Tensor, U: Tensor, cols: Tensor, i1: int, i: int, i2: int) -> Tensor:
    """The up-to-date weights of the (not yet quantized) columns ``cols``: those past the block ``[i1, i2)``
    still lack the block's pending update from its first ``i`` errors."""
    cur = W[:, cols].clone()
    late = cols >= i2
    cur[:, late] -= err[:, :i] @ U[i1:i1 + i, cols[late]]
    return cur


@torch.no_grad()
def gptq(w: Tensor, H: Tensor, bits: int, group: int, damp: float = 0.01, block: int = 128,
         act_order: bool = False) -> QuantizedTensor:
    """GPTQ of ``w [O, I]`` to ``bits`` with groups of ``group`` input columns, for inputs of Hessian
    ``H [I, I]`` (:func:`hessian`); the result is read by :func:`moekit.compress.quant.dequantize`."""
    shape = tuple(w.shape)
    check_layout(shape, bits, group)
    if len(shape) != 2 or tuple(H.shape) != (shape[1], shape[1]) or not bool(torch.isfinite(H).all()):
        raise ValueError(f"gptq: needs a weight [out, in] and a finite Hessian [in, in], got {shape} and "
                         f"{tuple(H.shape)}")
    if block < 1 or damp < 0:
        raise ValueError(f"gptq: block must be positive and damp non-negative, got block={block}, damp={damp}")
    n_out, n_in = shape
    dev = w.device
    W, H = w.detach().double().clone(), H.detach().to(dev, torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n_in, device=dev)
    W, U = W[:, perm], _inverse_factor(H[perm][:, perm], damp)
    where = torch.empty_like(perm)
    where[perm] = torch.arange(n_in, device=dev)  # where[j]: the position of input column j in the quantization order
    scale = torch.zeros(n_out, n_in // group, dtype=torch.float16, device=dev)
    zero = torch.zeros_like(scale) if bits > 1 else None
    started = [False] * (n_in // group)
    code = torch.zeros(n_out, n_in, dtype=torch.int64, device=dev)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        err = torch.zeros(n_out, i2 - i1, dtype=torch.float64, device=dev)
        for i in range(i2 - i1):
            g = int(perm[i1 + i]) // group
            if not started[g]:
                s, z = group_grid(_current(W, err, U, where[g * group:(g + 1) * group], i1, i, i2), bits)
                scale[:, g], started[g] = s, True
                if zero is not None:
                    zero[:, g] = z
            zg = None if zero is None else zero[:, g]
            c = grid_codes(W[:, i1 + i], scale[:, g], zg, bits)
            code[:, i1 + i] = c
            err[:, i] = (W[:, i1 + i] - grid_values(c, scale[:, g], zg).double()) / U[i1 + i, i1 + i]
            W[:, i1 + i:i2] -= err[:, i:i + 1] * U[i1 + i, i1 + i:i2]
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return QuantizedTensor(pack_bits(code[:, where], bits), scale, zero, bits, group, shape)
