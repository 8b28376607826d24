"""Rotary position embeddings and the KV-cache step shared by every attention in moekit (the GPT's
and the Read-ME PreGate's).

Shape legend: ``B`` batch, ``H`` heads, ``T`` time, ``K`` head width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Rotary", "rotate_and_cache"]


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # [T, K/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x_BHTK: Tensor, offset: int) -> Tensor:
        T = x_BHTK.shape[-2]
        if offset + T > self.cos.shape[0]:
            raise ValueError(f"sequence of {offset + T} tokens is longer than max_seq_len={self.cos.shape[0]}")
        cos, sin = self.cos[offset : offset + T].to(x_BHTK.dtype), self.sin[offset : offset + T].to(x_BHTK.dtype)
        x1, x2 = x_BHTK[..., 0::2], x_BHTK[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def rotate_and_cache(q: Tensor, k: Tensor, v: Tensor, rope: Rotary, cache: dict | None):
    """RoPE at the cache's offset, append to the KV cache, and the causal mask (``None`` for one query):
    ``(q, k, v, mask, offset)`` with ``k``/``v`` covering the whole sequence so far."""
    T = q.shape[-2]
    offset = 0 if cache is None or "k" not in cache else cache["k"].shape[-2]
    q, k = rope(q, offset), rope(k, offset)
    if cache is not None:
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=-2), torch.cat([cache["v"], v], dim=-2)
        cache["k"], cache["v"] = k, v
    S = k.shape[-2]
    mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    return q, k, v, mask, offset
