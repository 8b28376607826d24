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

__all__ = ["BITS", "QuantizedTensor", "check_layout", "dequantize", "grid_codes", "grid_values", "group_grid",
           "pack_bits", "quantize", "quantized_bytes", "unpack_bits"]

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


def check_layout(shape: tuple[int, ...], bits: int, group: int) -> None:
    """A ValueError unless a weight of ``shape`` can be quantized to ``bits`` with groups of ``group``."""
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
    check_layout(tuple(shape), bits, group)
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


def group_grid(g: Tensor, bits: int) -> tuple[Tensor, Tensor | None]:
    """The fp16 ``(scale, zero)`` of each group of ``g [..., group]`` (``zero`` is ``None`` at 1 bit): the
    grid :func:`quantize` rounds to, shared by :func:`moekit.compress.gptq.gptq`."""
    g = g.float()
    if bits == 1:
        return g.abs().mean(-1).half(), None
    levels = (1 << bits) - 1
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / levels).clamp_min(1e-6).half()
    return scale, lo.half()


def grid_codes(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """The int64 codes of ``w`` on the grid ``(scale, zero)`` (broadcast against ``w``)."""
    g = w.float()
    if zero is None:
        return (g >= 0).to(torch.int64)
    levels = (1 << bits) - 1
    return torch.round((g - zero.float()) / scale.float()).clamp(0, levels).to(torch.int64)


def grid_values(code: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """The float32 weights ``code`` stands for on the grid ``(scale, zero)`` (broadcast against ``code``)."""
    scale = scale.float()
    return (2 * code - 1) * scale if zero is None else zero.float() + code * scale


@torch.no_grad()
def quantize(w: Tensor, bits: int, group: int = 64) -> QuantizedTensor:
    """Round-to-nearest quantization of ``w [..., O, I]`` to ``bits`` with groups of ``group`` input columns."""
    shape = tuple(w.shape)
    check_layout(shape, bits, group)
    g = w.detach().float().reshape(*shape[:-1], shape[-1] // group, group)
    scale, zero = group_grid(g, bits)
    code = grid_codes(g, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), bits)
    return QuantizedTensor(pack_bits(code, bits), scale, zero, bits, group, shape)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight ``q`` stands for, of ``q.shape``."""
    n = math.prod(q.shape)
    code = unpack_bits(q.codes, q.bits, n).reshape(*q.shape[:-1], q.shape[-1] // q.group, q.group).float()
    zero = None if q.zero is None else q.zero.unsqueeze(-1)
    return grid_values(code, q.scale.unsqueeze(-1), zero).reshape(q.shape).to(dtype)
