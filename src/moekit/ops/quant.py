"""Weight quantizers: symmetric int8 with an absmax scale per row, and QLoRA's NormalFloat-4.

``int8``: ``scale = absmax(row) / 127``, ``code = round(x / scale)`` in ``[-127, 127]``, so
``x ~ code * scale`` and each row's largest magnitude is exact. ``nf4``: one absmax per ``block``
consecutive values of a row, each value coded by its nearest of the 16 NormalFloat levels (QLoRA,
Dettmers et al. 2023), two codes per byte with the first in the high nibble (bitsandbytes' order).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NF4_LEVELS", "dequantize_int8", "dequantize_nf4", "quantize_int8", "quantize_nf4"]

# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes, scale)`` of ``x [..., D]``: int8 codes ``[..., D]`` and fp32 scales ``[..., 1]``,
    one per row of ``D`` (``x ~ codes * scale``)."""
    x = x.detach().float()
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(codes: Tensor, scale: Tensor) -> Tensor:
    """Inverse of :func:`quantize_int8`: fp32 ``codes * scale``."""
    return codes.float() * scale


def quantize_nf4(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``(packed, scale)`` of ``x [b, ..., D]`` (``block`` divides ``D``): the codes of each of the
    ``b`` records flattened and packed two per byte, ``[b, numel / (2 b)]`` uint8, and the fp32
    absmax of every block, ``[b, ..., D / block, 1]``."""
    b = x.shape[0]
    xb = x.detach().float().reshape(*x.shape[:-1], -1, block)  # [b, ..., D/block, block]
    scale = xb.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    code = torch.bucketize((xb / scale).contiguous(), mids).to(torch.uint8).reshape(b, -1)
    packed = (code[:, 0::2] << 4) | code[:, 1::2]
    return packed, scale


def dequantize_nf4(packed: Tensor, scale: Tensor) -> Tensor:
    """Inverse of :func:`quantize_nf4`: ``packed [b, n]`` codes and ``scale [b, ..., blocks, 1]`` ->
    fp32 values ``[b, ..., blocks * block]``."""
    code = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(*scale.shape[:-1], -1).long()
    return (NF4_LEVELS[code] * scale).reshape(*scale.shape[:-2], -1)
