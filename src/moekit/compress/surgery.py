"""Cutting and merging the experts of one MoE layer, and keeping the model's description in step.

- :func:`prune_layer`: keep a subset of the experts; the router's rows are sliced, so its top-k is
  renormalised over the survivors (``k = min(k, E')``).
- :func:`merge_layer`: ``E'`` merged experts (``Σ c_i W_i`` per group) behind the original ``E``-row
  router (:class:`moekit.routers.GroupedTopK`).
- :func:`sync_config`: after layers were replaced, a GPT's per-layer FFN specs (so ``GPT.save`` /
  ``GPT.load`` round-trip) or a patched Hugging Face model's expert count (so ``unpatch_hf_model``
  and export build blocks of the new size).
- :func:`dedup_bytes`: parameter and buffer bytes, each storage counted once.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.layer import MoE
from moekit.models.config import GPTConfig
from moekit.routers import GroupedTopK, Router, TopK

__all__ = ["dedup_bytes", "merge_layer", "prune_layer", "router_args", "sync_config", "topk_router"]


def _rebuilt(moe: MoE, num_experts: int, router: Router, state: dict[str, Tensor]) -> MoE:
    """A layer like ``moe`` with ``num_experts`` experts, ``router`` and the weights ``state``."""
    with torch.device("meta"):
        new = MoE(moe.d_model, moe.d_ff, num_experts, router=router, activation=moe.experts.activation,
                  shared_d_ff=None if moe.shared_expert is None else moe.shared_expert.down_proj.in_features,
                  shared_gate=moe.shared_expert_gate is not None, bias=moe.experts.down_proj_bias is not None,
                  check_finite=moe.check_finite, backend=moe.experts.backend)
    new.load_state_dict(state, strict=True, assign=True)
    if isinstance(router, GroupedTopK):
        router.group_of = torch.tensor(router.groups, dtype=torch.long, device=router.weight.device)
    new.train(moe.training)
    if hasattr(moe, "hf_block_class"):
        new.hf_block_class = moe.hf_block_class
    return new


def topk_router(moe: MoE, who: str) -> TopK:
    """``moe``'s router when it is a plain TopK (no capacity), else a ValueError naming ``who``."""
    if type(moe.gate) is not TopK:
        raise ValueError(f"{who}: the layer's router must be moekit's TopK, got {type(moe.gate).__name__}; "
                         "compress a top-k MoE (a merged layer cannot be pruned or merged again)")
    if moe.gate.capacity_factor is not None:
        raise ValueError(f"{who}: a TopK router with capacity_factor is not supported; set capacity_factor=None")
    return moe.gate


def _expert_keys(moe: MoE) -> list[str]:
    return [f"experts.{n}" for n, _ in moe.experts.named_parameters()]


def prune_layer(moe: MoE, keep: Tensor | Sequence[int]) -> MoE:
    """A new layer with only the experts ``keep`` (in increasing id order): router rows and
    ``[E, ...]`` expert tensors sliced, ``k = min(k, E')``, the shared expert kept. On a token whose
    top-k lies among the kept experts the output equals ``moe``'s (with ``renormalize=True``)."""
    gate = topk_router(moe, "prune_layer")
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().unique()
    if keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= moe.num_experts:
        raise ValueError(f"prune_layer: keep must name experts in [0, {moe.num_experts}), got {keep.tolist()}")
    E2 = keep.numel()
    args = {**router_args(gate), "k": min(gate.k, E2)}
    state = {k: v.detach() for k, v in moe.state_dict().items()}
    idx = keep.to(moe.gate.weight.device)
    for name in ["gate.weight", *_expert_keys(moe)]:
        state[name] = state[name].index_select(0, idx).clone()
    return _rebuilt(moe, E2, TopK(**args), state)


def merge_layer(moe: MoE, groups: Sequence[int], coeffs: Tensor | Sequence[float]) -> MoE:
    """A new layer of ``E' = max(groups) + 1`` merged experts: merged expert ``g`` has the weights
    ``Σ_{i: groups[i] = g} coeffs[i] · W_i`` (coefficients used as given), behind the original
    ``E``-logit router mapped to the groups (:class:`moekit.routers.GroupedTopK`)."""
    gate = topk_router(moe, "merge_layer")
    groups = [int(g) for g in groups]
    if len(groups) != moe.num_experts:
        raise ValueError(f"merge_layer: groups must name the group of each of the {moe.num_experts} experts, "
                         f"got {len(groups)} entries")
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64).flatten()
    if coeffs.numel() != moe.num_experts or not bool(torch.isfinite(coeffs).all()):
        raise ValueError(f"merge_layer: coeffs must be {moe.num_experts} finite numbers, got {coeffs.tolist()}")
    args = {k: v for k, v in router_args(gate).items() if k in ("k", "renormalize", "balance", "z_loss", "scale")}
    router = GroupedTopK(groups, **args)  # validates the numbering
    E2 = max(groups) + 1
    state = {k: v.detach().clone() for k, v in moe.state_dict().items()}
    onehot = torch.zeros(E2, moe.num_experts, dtype=torch.float64)
    onehot[torch.tensor(groups), torch.arange(moe.num_experts)] = coeffs
    for name in _expert_keys(moe):
        w = state[name]
        state[name] = torch.einsum("ge,e...->g...", onehot.to(w.device), w.double()).to(w.dtype)
    return _rebuilt(moe, E2, router, state)


def router_args(router: Router) -> dict:
    """The keyword arguments that rebuild ``router`` (its constructor's parameters, read back from
    the attributes of the same names)."""
    names = [p for p in inspect.signature(type(router).__init__).parameters if p != "self"]
    missing = [n for n in names if not hasattr(router, n)]
    if missing:
        raise ValueError(f"{type(router).__name__}: cannot describe its arguments {missing} in a config")
    return {n: getattr(router, n) for n in names}


def sync_config(model: nn.Module) -> None:
    """Make ``model``'s description match its MoE layers: a GPT's ``config.ffn`` specs (experts,
    router, router arguments), or a patched Hugging Face model's expert count and top-k when every
    patched layer has the same (otherwise ``unpatch_hf_model`` refuses the layers that differ)."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, GPTConfig) and cfg.ffn is not None:
        for i, block in enumerate(model.blocks):
            if isinstance(block.ffn, MoE) and cfg.ffn[i].get("kind", "dense") == "moe":
                cfg.ffn[i] = {**cfg.ffn[i], "num_experts": block.ffn.num_experts, "router": block.ffn.gate.name,
                              "router_args": router_args(block.ffn.gate)}
        return
    patched = [m for m in model.modules() if isinstance(m, MoE) and hasattr(m, "hf_block_class")]
    sizes = {(m.num_experts, getattr(m.gate, "k", None)) for m in patched}
    if cfg is None or len(sizes) != 1:
        return
    (E, k), = sizes
    hf = getattr(cfg, "text_config", None) or cfg
    for name in ("num_local_experts", "num_experts"):
        if hasattr(hf, name):
            setattr(hf, name, E)
    hf.num_experts_per_tok = k


def dedup_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, each underlying storage counted once (shared or
    tied tensors are not double-counted)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_meta:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())
