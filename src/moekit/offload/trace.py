"""Routing traces: which experts each MoE layer needed, token by token, recorded from a real model.

A trace is the access stream of batch-1 decoding: for every token of every sequence, layer 0..L-1,
the experts its router chose (with their weights), in that order. Policies are compared on traces
recorded from trained models on held-out text, never on randomly initialised routers (their
near-uniform, memoryless routing says nothing about locality).

For a causal model whose router decides per token (top-k without a capacity limit, sigmoid gates,
PreGate), one forward over a whole sequence routes every token exactly as decoding it step by step
would, so :func:`record_trace` runs whole sequences.

Saved as safetensors (CSR arrays) with the metadata in its header: nothing is unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.io import IntegrityError, atomic_write
from moekit.offload.store import moe_layers

__all__ = ["Trace", "record_trace"]


@dataclass
class Trace:
    """``accesses[i] = (layer, experts)``: access ``i`` is one layer's forward for one token.

    Attributes:
        layer: ``[A]`` layer of each access.
        token: ``[A]`` position of the access's token in the stream (0, 1, ... across sequences).
        offsets: ``[A + 1]`` access ``i`` needs ``experts[offsets[i]:offsets[i+1]]``.
        experts, weights: ``[M]`` expert ids (by decreasing weight) and their combine weights.
        token_ids: ``[T]`` the token id of each position.
        num_experts: experts per layer.
        meta: where it came from (model, text, sizes).
    """

    layer: Tensor
    token: Tensor
    offsets: Tensor
    experts: Tensor
    weights: Tensor
    token_ids: Tensor
    num_experts: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.num_experts)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def __len__(self) -> int:
        return int(self.layer.numel())

    def accesses(self) -> list[tuple[int, list[int]]]:
        """``[(layer, [experts...]), ...]`` in stream order."""
        ex, off = self.experts.tolist(), self.offsets.tolist()
        return [(layer, ex[off[i]: off[i + 1]]) for i, layer in enumerate(self.layer.tolist())]

    def per_token(self) -> list[list[list[int]]]:
        """``[token][layer] -> experts``."""
        out: list[list[list[int]]] = [[[] for _ in range(self.num_layers)] for _ in range(self.num_tokens)]
        for tok, (layer, experts) in zip(self.token.tolist(), self.accesses()):
            out[tok][layer] = experts
        return out

    def gate_weights(self) -> list[list[float]]:
        w, off = self.weights.tolist(), self.offsets.tolist()
        return [w[off[i]: off[i + 1]] for i in range(len(self))]

    def head(self, tokens: int) -> Trace:
        """The first ``tokens`` tokens of the stream."""
        n = int((self.token < tokens).sum())
        m = int(self.offsets[n])
        return Trace(self.layer[:n], self.token[:n], self.offsets[: n + 1], self.experts[:m], self.weights[:m],
                     self.token_ids[:tokens], list(self.num_experts), dict(self.meta))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to ``path`` (atomically, with the SHA-256 of its tensors in its header); an
        existing file there must be a moekit trace."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and _format_of(path) != FORMAT:
            raise FileExistsError(f"{path}: exists and is not a moekit trace; choose another path")
        tensors = {"layer": self.layer.to(torch.int32), "token": self.token.to(torch.int64),
                   "offsets": self.offsets.to(torch.int64), "experts": self.experts.to(torch.int32),
                   "weights": self.weights.float(), "token_ids": self.token_ids.to(torch.int64)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"format": FORMAT, "num_experts": json.dumps(self.num_experts), "meta": json.dumps(self.meta),
                "sha256": _digest(tensors)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a trace written by :meth:`save`, checked against its SHA-256."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such trace; record one with moekit.offload.record_trace")
        fix = "record the trace again with moekit.offload.record_trace"
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise ValueError(f"{path}: not a moekit trace (no 'format: moekit-trace' in its metadata)")
                t = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise IntegrityError(f"{path}: not a readable trace (truncated or corrupt: {e}); {fix}") from None
        if md.get("sha256") != _digest(t):
            raise IntegrityError(f"{path}: checksum mismatch (the trace is corrupt); {fix}")
        return cls(t["layer"].long(), t["token"], t["offsets"], t["experts"].long(), t["weights"], t["token_ids"],
                   json.loads(md["num_experts"]), json.loads(md["meta"]))


FORMAT = "moekit-trace"


def _digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _format_of(path: Path) -> str | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None


@torch.no_grad()
def record_trace(model: nn.Module, sequences: Tensor | list[Tensor], forward=None, meta: dict | None = None) -> Trace:
    """Run ``model`` over each sequence (``[S]`` token ids; a ``[B, S]`` tensor is B sequences) and
    record the routing of every MoE layer, token by token. ``forward(model, ids_1S)`` runs the model
    (default: ``model(ids_1S)``)."""
    layers = moe_layers(model)
    if isinstance(sequences, Tensor):
        sequences = list(sequences) if sequences.dim() == 2 else [sequences]
    was = model.training
    model.eval()
    lay: list[int] = []
    tok: list[int] = []
    counts: list[int] = []
    exps: list[int] = []
    wts: list[float] = []
    ids: list[Tensor] = []
    pos = 0
    try:
        for seq in sequences:
            seq = seq.reshape(-1)
            (forward or (lambda m, x: m(x)))(model, seq.unsqueeze(0))
            S = seq.numel()
            per_layer = []  # per layer, per token: [(weight, expert), ...]
            for moe in layers:
                r = moe.last_routing
                if r is None or r.num_tokens != S:
                    raise ValueError(f"record_trace: an MoE layer routed {None if r is None else r.num_tokens} tokens for a "
                                     f"sequence of {S}; pass forward= that runs the whole sequence through every layer")
                buckets: list[list[tuple[float, int]]] = [[] for _ in range(S)]
                for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.detach().float().tolist()):
                    if w != 0:  # assignments kept only for a gradient (STE) load nothing
                        buckets[t].append((w, e))
                per_layer.append(buckets)
            for t in range(S):
                for li, buckets in enumerate(per_layer):
                    chosen = sorted(buckets[t], key=lambda we: -we[0])
                    lay.append(li)
                    tok.append(pos + t)
                    counts.append(len(chosen))
                    exps += [e for _, e in chosen]
                    wts += [w for w, _ in chosen]
            ids.append(seq.cpu())
            pos += S
    finally:
        model.train(was)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    return Trace(torch.tensor(lay, dtype=torch.long), torch.tensor(tok, dtype=torch.long), offsets,
                 torch.tensor(exps, dtype=torch.long), torch.tensor(wts, dtype=torch.float32), torch.cat(ids),
                 [m.num_experts for m in layers], dict(meta or {}))
