"""The MoLE lookup table on disk: its files, dtypes and the quantized record format.

After training (papers.md §3.3), ``FFN_j(RMSNorm_l(E[v]))`` is stored for every token ``v`` of the
vocabulary as a table ``[V, L, N, D]`` (one token's rows for all layers are contiguous, so a new
token costs one read), beside a manifest, one CRC-32 per token's record and a hash of the weights
the table came from.

Quantized tables (the paper's post-training quantisation, §3.5; the implementation is ours):
``int8`` with an fp16 absmax scale per row (``code = round(x * 127 / absmax)``), and ``nf4`` with
QLoRA's 16 NormalFloat levels, an fp16 absmax scale per ``block`` consecutive values of a row and
two codes per byte, the first in the high nibble (bitsandbytes' order); see :mod:`moekit.ops.quant`.
A token's record holds its values, then its fp16 scales. The paper quantizes MoLE-4E-160M to NF4
with blocks of **768** (one scale per row at d=768; 25.3% of the fp16 size) and to NF3 with blocks
of 128 (19.5%); our default block is **64** (QLoRA's default; 26.6% of fp16), so pass ``block=768``
(or ``block=d_model``) to :func:`moekit.models.mole.reparameterize` for the paper's setting. NF3 is
not implemented.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from moekit.ops.quant import NF4_LEVELS, dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4

__all__ = ["MANIFEST", "NF4_LEVELS", "QUANTIZED", "TABLE", "dequantize", "quantize", "record_bytes", "source_hash"]

MANIFEST = "manifest.json"
TABLE = "table.bin"
ROW_CRC = "table.crc32"
TABLE_KIND = "mole-table"
TABLE_FIX = "write the table again with moekit.models.mole.reparameterize (from the trained model)"
TABLE_FORMAT = 1
DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}
QUANTIZED = ("int8", "nf4")


def record_bytes(kind: str, L: int, N: int, D: int, block: int) -> int:
    """Bytes of one token's rows (all layers and experts) in a quantized table."""
    if kind == "int8":
        return L * N * D + L * N * 2  # int8 values + one fp16 absmax scale per row
    return L * N * D // 2 + L * N * (D // block) * 2  # packed 4-bit codes + one fp16 scale per block


def _fp16_bytes(scale: Tensor, b: int) -> np.ndarray:
    return scale.to(torch.float16).reshape(b, -1).numpy().view(np.uint8)


def quantize(x: Tensor, kind: str, block: int = 64) -> np.ndarray:
    """``x [b, L, N, D]`` fp32 -> ``[b, record_bytes]`` uint8 (values, then fp16 scales).

    ``int8``: one absmax per row of ``D``; ``nf4``: one absmax per ``block`` values (the paper: 768)."""
    b = x.shape[0]
    if kind == "int8":
        q, scale = quantize_int8(x)
        parts = [q.reshape(b, -1).numpy().view(np.uint8), _fp16_bytes(scale, b)]
    else:
        packed, scale = quantize_nf4(x, block)
        parts = [packed.numpy(), _fp16_bytes(scale, b)]
    return np.concatenate(parts, axis=1)


def dequantize(rec: np.ndarray, kind: str, shape: tuple[int, int, int], block: int = 64) -> Tensor:
    """Inverse of :func:`quantize`: ``[U, record_bytes]`` -> ``[U, L, N, D]`` fp32."""
    L, N, D = shape
    U = rec.shape[0]
    rec = torch.from_numpy(np.ascontiguousarray(rec))
    n = L * N * D if kind == "int8" else L * N * D // 2
    blocks = 1 if kind == "int8" else D // block
    scale = rec[:, n:].contiguous().view(torch.float16).float().view(U, L, N, blocks, 1)
    if kind == "int8":
        return dequantize_int8(rec[:, :n].view(torch.int8).view(U, L, N, D), scale[..., 0])
    return dequantize_nf4(rec[:, :n], scale).reshape(U, L, N, D)


def source_hash(tensors: Iterable[Tensor]) -> str:
    """SHA-256 of the fp32 bytes of the tensors a table is computed from: the embedding, then each
    layer's expert norm and expert weights (in parameter order)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
