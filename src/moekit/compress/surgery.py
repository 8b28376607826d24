"""Cutting and merging the experts of one MoE layer, and keeping the model's description in step.

- :func:`prune_layer`: keep a subset of the experts; the router's rows are sliced, so its top-k is
  renormalised over the survivors (``k = min(k, E')``).
- :func:`merge_layer`: ``E'`` merged experts (``Σ c_i W_i`` per group) behind the original ``E``-row
  router (:class:`moekit.routers.GroupedTopK`).
- :func:`sync_config`: after layers were replaced, a GPT's per-layer FFN specs (so ``GPT.save`` /
  ``GPT.load`` round-trip) or a patched Hugging Face model's expert count (so ``save_pretrained``,
  ``unpatch_hf_model`` and export build blocks of the new size).
- :func:`layer_spec` / :func:`build_layer`: a (compressed) layer as JSON and back, weights apart:
  what a Hugging Face MoE whose layers have no transformers counterpart is saved with
  (:func:`moekit.convert.save`, moekit's format).
- :func:`dedup_bytes`: parameter and buffer bytes, each storage counted once.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.compress.quantized import QuantizedExperts
from moekit.experts import GroupedExperts
from moekit.layer import MoE
from moekit.models.config import GPTConfig
from moekit.routers import GroupedTopK, Router, TopK, build_router

__all__ = ["build_layer", "dedup_bytes", "layer_spec", "merge_layer", "prune_layer", "router_args", "sync_config",
           "topk_router"]


def _shape(moe: MoE) -> dict:
    """The ``MoE`` constructor's arguments that describe ``moe`` besides its router and expert count."""
    ex = moe.experts
    if isinstance(ex, QuantizedExperts):
        bias = ex.experts[0].down_bias is not None
    elif isinstance(ex, GroupedExperts):
        bias = ex.down_proj_bias is not None
    else:
        raise ValueError(f"layer_spec: experts of type {type(ex).__name__} cannot be described (GroupedExperts or "
                         "QuantizedExperts)")
    return {"d_model": moe.d_model, "d_ff": moe.d_ff, "activation": ex.activation,
            "shared_d_ff": None if moe.shared_expert is None else moe.shared_expert.down_proj.in_features,
            "shared_gate": moe.shared_expert_gate is not None, "bias": bias, "check_finite": bool(moe.check_finite)}


def _empty(shape: dict, num_experts: int, router: Router, backend: str | None = None) -> MoE:
    return MoE(shape["d_model"], shape["d_ff"], num_experts, router=router, activation=shape["activation"],
               shared_d_ff=shape["shared_d_ff"], shared_gate=shape["shared_gate"], bias=shape["bias"],
               check_finite=shape["check_finite"], backend=backend)


def layer_spec(moe: MoE) -> dict:
    """``moe`` as JSON, weights apart: its widths, experts, router (registered name and arguments),
    shared expert, and each expert's bit width and the group when its experts are quantized
    (:class:`moekit.compress.QuantizedExperts`). :func:`build_layer` rebuilds the layer."""
    spec = {**_shape(moe), "num_experts": moe.num_experts, "router": moe.gate.name, "router_args": router_args(moe.gate)}
    if isinstance(moe.experts, QuantizedExperts):
        spec["quantized"] = {"bits": list(moe.experts.bits), "group": moe.experts.group}
    try:
        json.dumps(spec)
    except TypeError:
        raise ValueError(f"layer_spec: the arguments of the {moe.gate.name!r} router are not JSON "
                         f"({spec['router_args']!r}); such a layer cannot be saved") from None
    return spec


def build_layer(spec: dict) -> MoE:
    """The layer :func:`layer_spec` described, with fresh weights (loading a state dict fills them)."""
    moe = _empty(spec, spec["num_experts"], build_router(spec["router"], **spec["router_args"]))
    q = spec.get("quantized")
    if q is not None:
        moe.experts = QuantizedExperts(spec["num_experts"], spec["d_model"], spec["d_ff"], q["bits"], q["group"],
                                       spec["activation"], spec["bias"])
    return moe


def _rebuilt(moe: MoE, num_experts: int, router: Router, state: dict[str, Tensor]) -> MoE:
    """A layer like ``moe`` with ``num_experts`` experts, ``router`` and the weights ``state``."""
    with torch.device("meta"):
        new = _empty(_shape(moe), num_experts, router, getattr(moe.experts, "backend", None))
    new.load_state_dict(state, strict=True, assign=True)
    if isinstance(router, GroupedTopK):
        router.group_of = torch.tensor(router.groups, dtype=torch.long, device=router.weight.device)
    new.train(moe.training)
    if hasattr(moe, "hf_block_class"):
        new.hf_block_class = moe.hf_block_class
    return new


def topk_router(moe: MoE, who: str) -> TopK:
    """``moe``'s router when it is a plain TopK (no capacity), else a ValueError naming ``who``."""
    if moe.num_zc_experts:
        raise ValueError(f"{who}: the layer has {moe.num_zc_experts} zero-computation experts (MoE++), which "
                         "compression does not handle")
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
    ``[E, ...]`` expert tensors sliced, ``k = min(k, E')``, the shared expert (and its gate) kept.
    On a token whose top-k lies among the kept experts the output equals ``moe``'s when the router
    renormalises the k weights (Mixtral; ``norm_topk_prob=True``); without renormalisation
    (Qwen-MoE's and OLMoE's default) the weights are that token's softmax over the kept experts,
    as transformers computes them for a block of ``E'`` experts."""
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


def _experts_field(hf) -> str:
    """The config field that holds a Hugging Face MoE's expert count: ``num_local_experts`` (Mixtral,
    Qwen3-MoE) or ``num_experts`` (Qwen2-MoE, OLMoE), whichever name the other one aliases."""
    field = getattr(hf, "attribute_map", {}).get("num_experts", "num_experts")
    if field not in hf.to_dict():
        raise ValueError(f"sync_config: {type(hf).__name__} has no {field} field to hold the expert count")
    return field


class _NotTransformers:
    """``save_pretrained`` of a Hugging Face model whose MoE layers transformers cannot hold: refused."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __call__(self, *args, **kwargs) -> None:
        raise ValueError(f"save_pretrained: the compressed MoE layers ({self.why}) have no transformers "
                         "architecture; save the model in moekit's format with moekit.convert.save(model, path, "
                         "tokenizer), which moekit.load reads")


def _why_not_transformers(layers: list[MoE]) -> str | None:
    """What keeps patched layers from one transformers config (``None``: nothing)."""
    if any(type(m.gate) is not TopK for m in layers):
        return "merged: routed by " + ", ".join(sorted({type(m.gate).__name__ for m in layers} - {"TopK"}))
    if any(not isinstance(m.experts, GroupedExperts) for m in layers):
        return "quantized experts"
    if len({(m.num_experts, m.gate.k) for m in layers}) > 1:
        return f"different expert counts per layer: {[m.num_experts for m in layers]}"
    return None


def sync_config(model: nn.Module) -> None:
    """Make ``model``'s description match its MoE layers: a GPT's ``config.ffn`` specs (experts,
    router, router arguments), or a patched Hugging Face model's expert count (the field its
    architecture uses, see :func:`_experts_field`) and top-k when every patched layer has the same.
    A patched model whose layers no transformers config describes (merged, quantized, different
    counts per layer) keeps its config, and its transformers ``save_pretrained`` is replaced by a
    refusal that names :func:`moekit.convert.save` (a ``save_pretrained`` moekit bound is kept)."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, GPTConfig) and cfg.ffn is not None:
        for i, block in enumerate(model.blocks):
            if isinstance(block.ffn, MoE) and cfg.ffn[i].get("kind", "dense") == "moe":
                cfg.ffn[i] = {**cfg.ffn[i], "num_experts": block.ffn.num_experts, "router": block.ffn.gate.name,
                              "router_args": router_args(block.ffn.gate)}
        return
    patched = [m for m in model.modules() if isinstance(m, MoE) and hasattr(m, "hf_block_class")]
    if cfg is None or not patched:
        return
    why = _why_not_transformers(patched)
    if why is not None:
        if "save_pretrained" not in vars(model):
            model.save_pretrained = _NotTransformers(why)
        return
    hf = getattr(cfg, "text_config", None) or cfg
    setattr(hf, _experts_field(hf), patched[0].num_experts)
    hf.num_experts_per_tok = patched[0].gate.k


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
