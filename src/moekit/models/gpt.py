"""A small Llama-style causal LM whose FFN slot takes a dense FFN or any ``moekit.MoE``, per layer.

RMSNorm, rotary position embeddings, causal attention through ``F.scaled_dot_product_attention``,
SwiGLU FFNs, tied input/output embeddings by default. Attention can also report a per-token
importance for routers that ask for it (``context_keys`` containing ``"importance"``); only those
layers leave the SDPA path. In a causal LM the attention a token receives from later tokens is
not known when the token is computed (using it would leak the future into the routing), so the
importance is the attention the token received from the queries that exist so far — itself — as
a multiple of uniform attention: ``(t + 1) * mean_heads P[t, t]``. A router that asks for
``"gate_residual"`` (MoE++'s gating residual) gets the post-residual router logits of the previous MoE
layer of the same forward (none in the first MoE layer), in training, prefill and cached decoding alike.

Shape legend: ``B`` batch, ``T`` time, ``D`` model width, ``H`` heads, ``K`` head width, ``V`` vocab.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.io import MANIFEST, IntegrityError, kind_of, read_json, verify, write_folder
from moekit.layer import MoE
from moekit.models.config import GPTConfig
from moekit.models.ffn import build_ffn
from moekit.models.meo import MEO
from moekit.models.pregate import PreGate
from moekit.ops.rotary import Rotary, rotate_and_cache
from moekit.ops.sampling import Sampling, eos_ids, next_token
from moekit.routing import Router

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BTD: Tensor, rope: Rotary, cache: dict | None = None,
                want_importance: bool = False) -> tuple[Tensor, Tensor | None]:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v, mask, offset = rotate_and_cache(q, k, v, rope, cache)
        S = k.shape[-2]
        importance = None
        if want_importance:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            p_BHTS = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            y = p_BHTS @ v
            # Causal importance: of the queries that have seen token t so far only t itself exists, so
            # we use the attention t pays to itself, relative to uniform attention over its t + 1 keys.
            own = p_BHTS.diagonal(offset=S - T, dim1=-2, dim2=-1).mean(dim=1)  # [B, T]
            importance = own * torch.arange(S - T + 1, S + 1, device=x_BTD.device, dtype=own.dtype)
        elif mask is None or offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=mask is not None)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D)), importance


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, i: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = build_ffn(cfg, cfg.layer_ffn(i))

    @property
    def context_keys(self) -> tuple[str, ...]:
        """What the FFN slot asks of the model: its own ``context_keys`` or its router's."""
        gate = getattr(self.ffn, "gate", None)
        return tuple(getattr(self.ffn, "context_keys", gate.context_keys if isinstance(gate, Router) else ()))

    def forward(self, x: Tensor, rope: Rotary, token_ids: Tensor, embeddings: Tensor,
                cache: dict | None = None, expert_ids: Tensor | None = None, task_ids: Tensor | None = None,
                gate_residual: Tensor | None = None) -> Tensor:
        keys = self.context_keys
        a, importance = self.attn(self.attn_norm(x), rope, cache, want_importance="importance" in keys)
        x = x + a
        h = self.ffn_norm(x)
        if not keys:
            return x + self.ffn(h)
        context = {}
        for k in keys:
            if k == "token_ids":
                context[k] = token_ids.reshape(-1)
            elif k == "embeddings":
                context[k] = embeddings
            elif k == "importance":
                context[k] = importance.reshape(-1)
            elif k == "expert_ids":
                if expert_ids is None:
                    raise ValueError("this layer routes by pre-gated expert ids, but the GPT has no PreGate "
                                     "(set GPTConfig.pregate, or convert with moekit.convert.refactor)")
                context[k] = expert_ids.reshape(-1)
            elif k == "task_ids":
                if task_ids is None:
                    raise ValueError("this layer gates on the task (MEO): pass task_ids, one id per sequence, to "
                                     "GPT.forward/loss/generate")
                context[k] = task_ids
            elif k == "gate_residual":
                context[k] = gate_residual
            else:
                raise ValueError(f"GPT cannot provide the context {k!r}; it provides token_ids, embeddings, "
                                 "importance, expert_ids, task_ids, gate_residual")
        return x + self.ffn(h, **context)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.rope = Rotary(config.d_model // config.n_heads, config.max_seq_len, config.rope_theta)
        self.pregate = None
        if config.pregate:
            self.pregate = PreGate(config.vocab_size, **config.pregate)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02), residual projections scaled by 1/sqrt(2L). Routers (and the
        PreGate) keep their own init."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layers)
        in_router = {id(p) for m in self.modules() if isinstance(m, Router) for p in m.parameters()}
        in_router |= {id(p) for m in self.modules() if isinstance(m, (MEO, MoE)) for p in m.own_init_parameters()}
        if self.pregate is not None:
            in_router |= {id(p) for p in self.pregate.parameters()}
        for name, p in self.named_parameters():
            if id(p) in in_router or p.dim() < 2 or p.is_meta:  # meta: experts served from elsewhere
                continue
            is_out = name.endswith(("attn.proj.weight", "down_proj", "down_proj.weight"))
            nn.init.normal_(p, std=out_std if is_out else std)
        for m in self.modules():
            if isinstance(m, MEO):
                m.copy_first_expert()

    def forward(self, ids_BT: Tensor, caches: list[dict] | None = None, task_ids: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, V]``. ``caches`` (one dict per layer) enables incremental decoding; ``task_ids``
        (``[B]``) is each sequence's task, for layers that gate on it (MEO)."""
        if ids_BT.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"GPT: token ids must be int64/int32, got {ids_BT.dtype}")
        if ids_BT.numel() and (int(ids_BT.max()) >= self.config.vocab_size or int(ids_BT.min()) < 0):
            raise ValueError(
                f"GPT: token ids must lie in [0, {self.config.vocab_size}), got range "
                f"[{int(ids_BT.min())}, {int(ids_BT.max())}]; is the tokenizer the one this model was built for?"
            )
        x = emb = self.embed(ids_BT)
        expert_ids = None
        if self.pregate is not None:  # Read-ME: every layer's expert is decided before the backbone runs
            expert_ids = self.pregate.route(ids_BT, None if caches is None else caches[0].setdefault("pregate", {}))
        gate_residual = None
        for i, block in enumerate(self.blocks):
            x = block(x, self.rope, ids_BT, emb, None if caches is None else caches[i], expert_ids, task_ids,
                      gate_residual)
            r = block.ffn.last_routing if isinstance(block.ffn, MoE) else None
            if r is not None and r.logits is not None:  # the next MoE++ layer's gating residual
                gate_residual = r.logits
        return self.head(self.norm(x))

    def loss(self, ids_BT: Tensor, targets_BT: Tensor, task_ids: Tensor | None = None) -> Tensor:
        logits = self(ids_BT, task_ids=task_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets_BT.reshape(-1))

    @torch.no_grad()
    def generate(self, ids_BT: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None, *, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, task_ids: Tensor | None = None) -> Tensor:
        """Continue ``ids`` with a KV cache: greedy (``temperature=0``) or sampled with ``temperature``,
        ``top_k`` and ``top_p`` (Hugging Face's conventions, :mod:`moekit.ops.sampling`). A row that
        produces an ``eos_token_id`` is finished: it is padded with that token while the others go on,
        and generation stops when every row is finished. ``task_ids`` as in :meth:`forward`. Returns
        ``[B, T + new]``, ``new <= max_new_tokens``."""
        if ids_BT.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"generate: {ids_BT.shape[1]} prompt + {max_new_tokens} new tokens exceed max_seq_len={self.config.max_seq_len}"
            )
        sampling = Sampling(temperature, top_k, top_p)
        eos = torch.tensor(eos_ids(eos_token_id, self.config.vocab_size), device=ids_BT.device, dtype=ids_BT.dtype)
        caches = [{} for _ in self.blocks]
        logits = self(ids_BT, caches, task_ids)[:, -1]
        out = [ids_BT]
        done = torch.zeros(ids_BT.shape[0], 1, dtype=torch.bool, device=ids_BT.device)
        for i in range(max_new_tokens):
            nxt = next_token(logits, sampling, generator)
            if len(eos):
                nxt = torch.where(done, eos[0], nxt)
                done = done | torch.isin(nxt, eos)
            out.append(nxt)
            if i + 1 == max_new_tokens or bool(done.all()):
                break
            logits = self(nxt, caches, task_ids)[:, -1]
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------------------------- sizes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters used per token: experts count ``k / E`` of theirs (``k`` the mean FFN experts per
        token of each router's last forward, or its configured ``k``; a layer's zero-computation
        experts are not FFN experts and do not count in ``k``; an MEO layer merges its ``k`` into one
        FFN, whose compute is one expert's)."""
        total = self.num_params()
        for block in self.blocks:
            if isinstance(block.ffn, MEO):
                experts = block.ffn.expert_params()
                total -= experts - experts * block.ffn.k // block.ffn.num_experts
            if isinstance(block.ffn, MoE):
                experts = sum(p.numel() for p in block.ffn.experts.parameters())
                r = block.ffn.last_routing
                k = (r.num_assignments / max(r.num_tokens, 1)) if r is not None else getattr(block.ffn.gate, "k", 1)
                total -= experts - int(experts * k / block.ffn.num_experts)
        return total

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    # ------------------------------------------------------------------------------- save / load

    def save(self, path: str | os.PathLike, files: dict[str, str | bytes] | None = None) -> Path:
        """``path/config.json`` + ``path/model.safetensors`` (+ ``files``, such as ``tokenizer.json``)
        and their checksums (``moekit.json``). A new folder appears complete or not at all; an
        existing one must be a moekit model."""
        from safetensors.torch import save_model

        with write_folder(path, MODEL_KIND, "model folder") as w:
            w.write(WEIGHTS_FILE, lambda tmp: save_model(self, tmp))
            w.write_text(CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2))
            for name, data in (files or {}).items():
                w.write_bytes(name, data.encode("utf-8") if isinstance(data, str) else data)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GPT:
        model = cls(read_config(path))
        model.load_weights(path)
        return model

    def load_weights(self, path: str | os.PathLike, verified: bool = False) -> None:
        """Load a checkpoint saved by :meth:`save` (verified first, unless the caller just did:
        ``verified``); its config must equal this model's."""
        from safetensors.torch import load_model

        if not verified:
            verify_model(path)
        saved = read_config(path)
        diff = saved.diff(self.config)
        if diff:
            detail = "; ".join(f"{k}: checkpoint={a!r} model={b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{path}: checkpoint config differs from the model's ({detail})")
        load_model(self, str(Path(path) / WEIGHTS_FILE), strict=True)


MODEL_KIND = "model"
MODEL_FIX = "the model folder is damaged or incomplete: save or train the model again, or restore it from a copy"


def verify_model(path: str | os.PathLike, only: list[str] | None = None) -> dict:
    """Check a model folder written by :meth:`GPT.save` or ``moekit.convert.save`` against its
    checksums (every file, or those in ``only``); returns its manifest."""
    p = Path(path)
    if kind_of(p) == "train-run":
        raise IntegrityError(f"{p}: a moekit training run, not a model; its model is {p / 'model'}")
    if p.is_dir() and not (p / MANIFEST).exists():
        if not (p / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{p / CONFIG_FILE}: missing; was the model written by GPT.save?")
        raise IntegrityError(f"{p}: no {MANIFEST}: not a model folder moekit wrote (or its save was interrupted); "
                             "load a plain Hugging Face model with transformers' from_pretrained, or save it with "
                             "moekit again")
    return verify(p, MODEL_KIND, MODEL_FIX, only)


def read_config(path: str | os.PathLike) -> GPTConfig:
    """The config of a model folder written by :meth:`GPT.save` (checked against its checksum)."""
    p = Path(path) / CONFIG_FILE
    verify_model(path, only=[CONFIG_FILE])
    try:
        return GPTConfig.from_dict(read_json(p, MODEL_FIX))
    except (TypeError, KeyError) as e:
        raise ValueError(f"{p}: not a moekit GPT config ({e})") from None


__all__ = ["GPT", "GPTConfig", "Block", "Attention", "Rotary", "build_ffn", "read_config", "verify_model"]
