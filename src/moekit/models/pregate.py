"""Read-ME's pre-gating router network (Cai et al., NeurIPS 2024; papers.md §2.3).

``PreGate`` is one small causal transformer block over the token ids, decoupled from the backbone:
its top-1 choice is the expert of the token in *every* layer, so the routing of a whole sequence is
known before the backbone runs (lookahead caching, prefetching, expert-aware batching). As in the
official code: embedding initialised from the first columns of the LM's input embedding; RMSNorm;
q/k/v and output projections with biases; RoPE; attention scores *not* scaled by 1/sqrt(d_head)
(``attn_scale=1``); a plain SiLU MLP (not gated); logits from a biased linear head; routing is the
argmax, with no gate value on the expert's output. It is trained only by distillation
(``moekit.convert.refactor``), never by the LM loss. The per-layer router that reads its choice is
:class:`moekit.routers.pregate.PreGated`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.ops.rotary import Rotary, rotate_and_cache

__all__ = ["PreGate"]


class PreGate(nn.Module):
    """Args:
    vocab_size, num_experts: token vocabulary and experts per layer.
    d_model, n_heads, d_ff: width, heads and MLP width of the block (paper: 512, 4, 512).
    max_seq_len: longest sequence (rotary table).
    attn_scale: attention score scale (the official code: 1, i.e. no 1/sqrt(d_head)).
    """

    def __init__(self, vocab_size: int, num_experts: int, d_model: int = 64, n_heads: int = 4, d_ff: int | None = None,
                 max_seq_len: int = 2048, attn_scale: float = 1.0, rope_theta: float = 10000.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"PreGate: d_model={d_model} must split into n_heads={n_heads} heads of even width")
        if num_experts < 1:
            raise ValueError(f"PreGate: num_experts must be >= 1, got {num_experts}")
        d_ff = d_ff or d_model
        self._config = {"vocab_size": vocab_size, "num_experts": num_experts, "d_model": d_model, "n_heads": n_heads,
                        "d_ff": d_ff, "max_seq_len": max_seq_len, "attn_scale": attn_scale,
                        "rope_theta": rope_theta, "eps": eps}
        self.num_experts, self.n_heads, self.attn_scale = num_experts, n_heads, attn_scale
        self.embed = nn.Embedding(vocab_size, d_model)
        self.attn_norm = nn.RMSNorm(d_model, eps=eps)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.RMSNorm(d_model, eps=eps)
        self.proj_1 = nn.Linear(d_model, d_ff)
        self.proj_2 = nn.Linear(d_ff, d_model)
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.head = nn.Linear(d_model, num_experts)
        self.rope = Rotary(d_model // n_heads, max_seq_len, rope_theta)

    def config(self) -> dict:
        """The constructor's arguments (saved with a converted model)."""
        return dict(self._config)

    @torch.no_grad()
    def init_embedding(self, weight: Tensor) -> None:
        """Copy the first ``d_model`` columns of an LM's input embedding (the official initialisation)."""
        V, D = min(weight.shape[0], self.embed.num_embeddings), min(weight.shape[1], self.embed.embedding_dim)
        self.embed.weight[:V, :D].copy_(weight[:V, :D])

    def forward(self, ids_BT: Tensor, cache: dict | None = None) -> Tensor:
        """Router logits ``[B, T, E]`` (fp32). ``cache`` (a dict) enables incremental decoding."""
        B, T = ids_BT.shape
        x = self.embed(ids_BT)
        H, K = self.n_heads, x.shape[-1] // self.n_heads
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, H, K).permute(2, 0, 3, 1, 4)
        q, k, v, mask, _ = rotate_and_cache(q, k, v, self.rope, cache)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.attn_scale)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, -1))
        x = x + self.proj_2(F.silu(self.proj_1(self.mlp_norm(x))))
        return self.head(self.norm(x)).float()

    @torch.no_grad()
    def route(self, ids_BT: Tensor, cache: dict | None = None) -> Tensor:
        """The expert of every token, for every layer: ``[B, T]`` (argmax, top-1)."""
        return self(ids_BT, cache).argmax(-1)
