"""MoLE's train form (Jie et al., ICML 2025, papers.md §3.2, exactly as the official code) and its FFN kind.

In layer ``l`` the routed experts read the token's *raw embedding* through a per-layer RMSNorm, all
``N`` experts are active with a softmax router (fp32) on the context hidden state, and a shared FFN
runs on the hidden state: ``out = shared(u) + sum_j softmax(W_r u)_j * FFN_j(RMSNorm_l(E[id]))``; no
auxiliary loss. Because an expert's input depends only on the token id, each expert runs once per
*unique* id in the batch and the results are gathered (mathematically identical, much cheaper).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.dispatch import Segments
from moekit.experts import GroupedExperts
from moekit.layer import FFN
from moekit.models.ffn import register_ffn

__all__ = ["MoLE", "mole_ffn", "mole_layers"]


class MoLE(nn.Module):
    """The MoLE FFN block, train form.

    Args:
        d_model: model width.
        d_ff: width of the shared FFN (the dense model's FFN).
        num_experts: routed experts ``N`` (all active).
        expert_d_ff: width of each routed expert.
        activation: the shared FFN's activation; ``expert_activation``: the experts' (the paper's
            Pythia-style models use a plain GELU FFN).
    """

    context_keys = ("token_ids", "embeddings")

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 4, expert_d_ff: int | None = None,
                 activation: str = "swiglu", expert_activation: str = "gelu", eps: float = 1e-5) -> None:
        super().__init__()
        self.d_model, self.num_experts = d_model, num_experts
        self.shared = FFN(d_model, d_ff, activation)
        self.router = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.expert_norm = nn.RMSNorm(d_model, eps=eps)
        self.experts = GroupedExperts(num_experts, d_model, expert_d_ff or d_ff, expert_activation)

    def gates(self, u_TD: Tensor) -> Tensor:
        return torch.softmax(nn.functional.linear(u_TD.float(), self.router.weight.float()), dim=-1)

    def expert_rows(self, emb_UD: Tensor) -> Tensor:
        """``FFN_j(RMSNorm(e))`` for every row ``e`` and expert ``j``: ``[U, N, D]``."""
        U, N = emb_UD.shape[0], self.num_experts
        x = self.expert_norm(emb_UD).repeat(N, 1)  # expert-major: N segments of U rows
        y = self.experts(x, Segments.from_counts(torch.full((N,), U, dtype=torch.long, device=x.device)))
        return y.view(N, U, -1).transpose(0, 1)

    def forward(self, u: Tensor, token_ids: Tensor | None = None, embeddings: Tensor | None = None) -> Tensor:
        if token_ids is None or embeddings is None:
            raise ValueError("MoLE needs token_ids and the raw token embeddings (moekit.models.GPT passes both)")
        shape = u.shape
        u_TD = u.reshape(-1, self.d_model)
        ids = token_ids.reshape(-1)
        uniq, inv = torch.unique(ids, return_inverse=True)
        # one position per unique id (any one will do: equal ids have equal embedding rows)
        where = torch.zeros_like(uniq).scatter_(0, inv, torch.arange(ids.numel(), device=ids.device))
        rows = self.expert_rows(embeddings.reshape(-1, self.d_model).index_select(0, where))  # [U, N, D]
        routed = torch.einsum("tn,tnd->td", self.gates(u_TD).to(rows.dtype), rows.index_select(0, inv))
        return (self.shared(u_TD) + routed).reshape(shape)


@register_ffn("mole")
def mole_ffn(cfg, spec: dict) -> MoLE:
    """The ``mole`` FFN kind of the GPT: ``shared_d_ff`` (default the model's ``d_ff``) for the shared
    FFN, ``d_ff`` for each of the ``num_experts`` routed experts."""
    return MoLE(cfg.d_model, spec.get("shared_d_ff", cfg.d_ff), spec.get("num_experts", 4), spec.get("d_ff", cfg.d_ff),
                spec.get("activation", "swiglu"), spec.get("expert_activation", "gelu"), cfg.norm_eps)


def mole_layers(model) -> list[MoLE]:
    """The MoLE blocks of a GPT whose every layer is MoLE (the only form a table is written for)."""
    layers = [b.ffn for b in model.blocks if isinstance(b.ffn, MoLE)]
    if not layers:
        raise ValueError("reparameterize: the model has no MoLE layer (GPTConfig.ffn kind 'mole')")
    if len(layers) != len(model.blocks):
        raise ValueError("reparameterize: every layer must be MoLE (mixed models are not supported yet)")
    return layers
