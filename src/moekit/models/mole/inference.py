"""MoLE's inference form: the shared FFN and router, plus rows read from the lookup table (no expert computed)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from moekit.models.gpt import GPT, WEIGHTS_FILE
from moekit.models.loading import TIED, load_without_experts
from moekit.models.mole.format import source_hash
from moekit.models.mole.lookup import LookupTable
from moekit.models.mole.train import MoLE, mole_layers

__all__ = ["MoLELookup", "load_served"]


class MoLELookup(nn.Module):
    """MoLE block, inference form: shared FFN + router + rows read from the lookup table.

    In fp32 inference the router's ``N`` rows ride along in the shared FFN's up projection (one
    matmul of width ``d_ff + N`` instead of two; the fused weight is rebuilt whenever a source weight
    changes), so a decode step costs the dense FFN plus a softmax over ``N`` and one ``[1, N] x [N, D]``
    multiply-add.
    """

    context_keys = ("token_ids",)

    def __init__(self, trained: MoLE, table: LookupTable, layer: int) -> None:
        super().__init__()
        self.d_model, self.num_experts, self.layer = trained.d_model, trained.num_experts, layer
        self.shared, self.router = trained.shared, trained.router
        self.table = table
        self._fused: tuple[tuple, Tensor] | None = None

    def gates(self, u_TD: Tensor) -> Tensor:
        """Softmax router in fp32 (no casts when the model already is fp32)."""
        if u_TD.dtype == torch.float32 and self.router.weight.dtype == torch.float32:
            return torch.softmax(nn.functional.linear(u_TD, self.router.weight), dim=-1)
        return torch.softmax(nn.functional.linear(u_TD.float(), self.router.weight.float()), dim=-1)

    def _inference_weights(self) -> tuple | None:
        """``([up_proj; router], gate_proj, down_proj)`` weights for fp32 inference without autograd,
        rebuilt whenever a source weight is replaced or changed in place; ``None`` where the fused
        path does not apply (biases, another dtype)."""
        sh = self.shared
        srcs = (sh.up_proj.weight, self.router.weight, sh.gate_proj.weight if sh.act.gated else None,
                sh.down_proj.weight)
        key = tuple((t.data_ptr(), t._version) for t in srcs if t is not None)
        if self._fused is not None and self._fused[0] == key:
            return self._fused[1]
        if (sh.up_proj.bias is not None or sh.down_proj.bias is not None
                or any(t is not None and t.dtype != torch.float32 for t in srcs)):
            return None
        up, r, gate, down = srcs
        self._fused = (key, (torch.cat([up, r]).detach(), None if gate is None else gate.detach(), down.detach()))
        return self._fused[1]

    def forward(self, u: Tensor, token_ids: Tensor | None = None, **context) -> Tensor:
        if token_ids is None:
            raise ValueError("MoLELookup needs token_ids")
        shape = u.shape
        u_TD = u.reshape(-1, self.d_model)
        ids = token_ids.reshape(-1)
        w = None if torch.is_grad_enabled() or u.dtype != torch.float32 else self._inference_weights()
        if w is None:
            y_TD, g_TN = self.shared(u_TD), self.gates(u_TD).to(u.dtype)
        else:
            w_up_router, w_gate, w_down = w
            up, z = nn.functional.linear(u_TD, w_up_router).split([w_down.shape[1], self.num_experts], dim=-1)
            fn = self.shared.act.fn
            y_TD = nn.functional.linear(fn(nn.functional.linear(u_TD, w_gate)) * up if w_gate is not None else fn(up),
                                        w_down)
            g_TN = torch.softmax(z, dim=-1)
        if ids.numel() == 1:  # decoding one token: no unique, no gather, one fused multiply-add
            rows = self.table.read_one(ids, self.layer)  # [N, D]
            return torch.addmm(y_TD, g_TN, rows if rows.dtype == u.dtype else rows.to(u.dtype)).reshape(shape)
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = self.table.read(uniq, self.layer).to(u.dtype)  # [U, N, D]
        routed = torch.bmm(g_TN.unsqueeze(1), rows.index_select(0, inv)).squeeze(1)
        return (y_TD + routed).reshape(shape)


def _checkpoint_hash(weights: Path, layers: list[MoLE]) -> str:
    """:func:`~moekit.models.mole.format.source_hash` of a checkpoint's table sources, one tensor at a time."""
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        emb = "embed.weight" if "embed.weight" in keys else TIED["embed.weight"]
        names = [emb] + [f"blocks.{i}.ffn.{sub}.{n}" for i, m in enumerate(layers)
                         for sub, mod in (("expert_norm", m.expert_norm), ("experts", m.experts))
                         for n, _ in mod.named_parameters()]
        return source_hash(f.get_tensor(n) for n in names)


def load_served(checkpoint: str | os.PathLike, table: str | os.PathLike, cache_bytes: int = 0) -> GPT:
    """The inference-form model from a train-form checkpoint (``GPT.save``) and its table folder,
    without ever materialising the experts: only the dense part, routers and norms are loaded, the
    expert weights are streamed one tensor at a time to check the table's hash."""

    def swap(model: GPT, manifest: dict) -> None:
        layers = mole_layers(model)
        lookup = LookupTable(table, expect_hash=_checkpoint_hash(Path(checkpoint) / WEIGHTS_FILE, layers),
                             cache_bytes=cache_bytes)
        for i, block in enumerate(model.blocks):
            block.ffn = MoLELookup(block.ffn, lookup, i)

    return load_without_experts(checkpoint, swap)
