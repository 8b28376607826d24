"""Group-wise round-to-nearest weight quantization at 1, 2, 3, 4 or 8 bits, with the codes really
packed into bytes (MC-MoE's per-expert mixed precision stores each expert this way).

Each row of a weight ``[..., O, I]`` is cut into groups of ``group`` consecutive input columns.

- ``b >= 2`` (asymmetric): per group an fp16 ``scale = (max - min) / (2^b - 1)`` and an fp16
  ``zero = min``; ``code = round((w - zero) / scale)`` in ``[0, 2^b - 1]``, ``w ~ zero + code * scale``.
  The codes are computed from the fp16-rounded scale and zero, so dequantizing is exactly what the
  codes were chosen for.
- ``b = 1``: per group an fp16 ``scale = mean|w|``; ``code = (sign(w) + 1) / 2`` (``sign(0) = +1``),
  ``w ~ (2 code - 1) * scale``; no zero.

Packing: the codes of the whole tensor in row-major order form one bit stream, code ``i`` taking bits
``[i b, (i + 1) b)`` with its least significant bit first, eight bits per byte, least significant
first; the last byte is zero-padded. :func:`quantized_bytes` counts the codes, the scales and the
zeros: the overhead of fp16 scale+zero is ``32 / group`` bits per weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BITS", "QuantizedTensor", "dequantize", "pack_bits", "quantize", "quantized_bytes", "unpack_bits"]

#: the supported code widths
BITS = (1, 2, 3, 4, 8)


@dataclass
class QuantizedTensor:
    """A weight quantized by :func:`quantize`: ``codes`` the packed uint8 bit stream, ``scale`` (and
    ``zero`` for ``bits >= 2``, else ``None``) fp16 ``[..., O, I / group]``, the original ``shape``."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    group: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes, scales and zeros."""
        extra = 0 if self.zero is None else self.zero.numel() * self.zero.element_size()
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size() + extra


def _check(shape: tuple[int, ...], bits: int, group: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quantize: bits must be one of {BITS}, got {bits!r}")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"quantize: group must be a positive integer, got {group!r}")
    if len(shape) < 2 or shape[-1] % group:
        raise ValueError(f"quantize: the input dim of a weight [..., out, in] must be a multiple of group={group}, "
                         f"got shape {tuple(shape)}; pick a group that divides {shape[-1] if shape else '?'}")


def quantized_bytes(shape: tuple[int, ...], bits: int, group: int = 64) -> int:
    """Exact bytes :func:`quantize` stores for a weight of ``shape``: ``ceil(numel * bits / 8)`` for the
    codes plus 2 bytes of scale (and 2 of zero when ``bits >= 2``) per group."""
    _check(tuple(shape), bits, group)
    n = math.prod(shape)
    return math.ceil(n * bits / 8) + (n // group) * (2 if bits == 1 else 4)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """The codes (integers in ``[0, 2^bits)``) as one little-endian bit stream, ``ceil(n bits / 8)`` uint8."""
    c = codes.reshape(-1).to(torch.int64)
    stream = ((c.unsqueeze(1) >> torch.arange(bits, device=c.device)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = torch.tensor([1 << i for i in range(8)], device=c.device)
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, int64."""
    stream = (packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)


@torch.no_grad()
def quantize(w: Tensor, bits: int, group: int = 64) -> QuantizedTensor:
    """Round-to-nearest quantization of ``w [..., O, I]`` to ``bits`` with groups of ``group`` input columns."""
    shape = tuple(w.shape)
    _check(shape, bits, group)
    g = w.detach().float().reshape(*shape[:-1], shape[-1] // group, group)
    if bits == 1:
        scale = g.abs().mean(-1).half()
        code = (g >= 0).to(torch.int64)
        return QuantizedTensor(pack_bits(code, 1), scale, None, 1, group, shape)
    levels = (1 << bits) - 1
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / levels).clamp_min(1e-6).half()
    zero = lo.half()
    code = torch.round((g - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp(0, levels)
    return QuantizedTensor(pack_bits(code, bits), scale, zero, bits, group, shape)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight ``q`` stands for, of ``q.shape``."""
    n = math.prod(q.shape)
    code = unpack_bits(q.codes, q.bits, n).reshape(*q.shape[:-1], q.shape[-1] // q.group, q.group).float()
    scale = q.scale.float().unsqueeze(-1)
    w = (2 * code - 1) * scale if q.zero is None else q.zero.float().unsqueeze(-1) + code * scale
    return w.reshape(q.shape).to(dtype)
