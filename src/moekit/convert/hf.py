"""Hugging Face interop: turn transformers' sparse-MoE blocks into ``moekit.MoE`` and back.

Supported blocks (transformers 5.x): Mixtral, Qwen2-MoE (shared expert with its sigmoid gate),
Qwen3-MoE and OLMoE. ``moekit.MoE`` uses the same parameter names and 3D layout as these blocks,
so the conversion is a state-dict copy, and a patched model's ``save_pretrained`` output loads
back into plain transformers.

Differences that matter only in training: HF computes its load-balancing loss outside the block
(``output_router_logits=True``) with ``f_e`` counted per token, i.e. ``k`` times moekit's
per-assignment value; ``patch_hf_model`` therefore sets moekit's coefficient to
``router_aux_loss_coef * k`` so the objective has the same scale. Mixtral's jitter perturbs the
whole block input; moekit's ``TopK(jitter=...)`` perturbs the router input only (Switch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from moekit.experts import GroupedExperts
from moekit.layer import MoE
from moekit.routers import TopK


@dataclass(frozen=True)
class _BlockSpec:
    has_shared: bool
    experts_attr: str = "num_experts"  # name of E on the block's router


_BLOCKS: dict[str, _BlockSpec] = {
    "MixtralSparseMoeBlock": _BlockSpec(has_shared=False),
    "Qwen2MoeSparseMoeBlock": _BlockSpec(has_shared=True),
    "Qwen3MoeSparseMoeBlock": _BlockSpec(has_shared=False),
    "OlmoeSparseMoeBlock": _BlockSpec(has_shared=False),
}

_ACTIVATIONS = {"SiLUActivation": "swiglu", "SiLU": "swiglu", "GELUActivation": "geglu", "GELU": "geglu"}


def supported_blocks() -> list[str]:
    return sorted(_BLOCKS)


def is_supported_block(module: nn.Module) -> bool:
    return type(module).__name__ in _BLOCKS and type(module).__module__.startswith("transformers.")


def _spec(block: nn.Module, who: str) -> _BlockSpec:
    if not isinstance(block, nn.Module) or not is_supported_block(block):
        raise TypeError(
            f"{who}: unsupported block type {type(block).__module__}.{type(block).__name__}; "
            f"supported transformers blocks are {supported_blocks()}"
        )
    return _BLOCKS[type(block).__name__]


def _activation(block: nn.Module, who: str) -> str:
    name = type(block.experts.act_fn).__name__
    if name not in _ACTIVATIONS:
        raise TypeError(f"{who}: unsupported expert activation {name}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _describe(block: nn.Module) -> dict:
    gate, experts = block.gate, block.experts
    E, two_f, d = experts.gate_up_proj.shape
    return {
        "num_experts": E,
        "d_model": d,
        "d_ff": two_f // 2,
        "k": gate.top_k,
        "renormalize": bool(getattr(gate, "norm_topk_prob", True)),
        "shared_d_ff": block.shared_expert.down_proj.in_features if hasattr(block, "shared_expert") else None,
        "bias": getattr(experts, "gate_up_proj_bias", None) is not None,
    }


def from_hf(
    block: nn.Module,
    balance: float = 0.01,
    z_loss: float = 0.0,
    backend: str | None = None,
    copy_weights: bool = True,
) -> MoE:
    """A ``moekit.MoE`` computing exactly what the transformers block computes (in eval mode).

    Args:
        block: a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE sparse-MoE block.
        balance, z_loss: coefficients of moekit's auxiliary losses (training only).
        backend: force an expert backend (default: automatic).
        copy_weights: ``False`` shares the block's tensors instead of copying them.
    """
    spec = _spec(block, "from_hf")
    info = _describe(block)
    router = TopK(
        k=info["k"],
        renormalize=info["renormalize"],
        balance=balance,
        z_loss=z_loss,
        jitter=float(getattr(block, "jitter_noise", 0.0) or 0.0),
    )
    with torch.device("meta"):
        moe = MoE(
            info["d_model"],
            info["d_ff"],
            info["num_experts"],
            router=router,
            activation=_activation(block, "from_hf"),
            shared_d_ff=info["shared_d_ff"] if spec.has_shared else None,
            shared_gate=spec.has_shared,
            bias=info["bias"],
            backend=backend,
        )
    state = block.state_dict()
    if copy_weights:
        state = {k: v.clone() for k, v in state.items()}
    moe.load_state_dict(state, strict=True, assign=True)
    moe.train(block.training)
    moe.hf_block_class = type(block)
    return moe


def check_block(moe: MoE, like: nn.Module, who: str = "to_hf") -> None:
    """Raise a ValueError naming what differs unless ``moe`` has the shape of the transformers block
    ``like`` (experts, widths, top-k router with the same k and renormalisation, shared expert)."""
    spec = _spec(like, who)
    if not isinstance(moe, MoE):
        raise TypeError(f"{who}: expected a moekit.MoE, got {type(moe).__name__}")
    if not isinstance(moe.experts, GroupedExperts):
        raise ValueError(f"{who}: transformers blocks hold their experts' weights as plain tensors; this layer's "
                         f"experts are {type(moe.experts).__name__}")
    if moe.num_zc_experts:
        raise ValueError(f"{who}: the layer has zero-computation experts (MoE++), which no transformers block holds")
    want = _describe(like)
    router = moe.gate
    have = {
        "num_experts": moe.num_experts,
        "d_model": moe.d_model,
        "d_ff": moe.d_ff,
        "k": getattr(router, "k", None),
        "renormalize": getattr(router, "renormalize", None),
        "shared_d_ff": moe.shared_expert.down_proj.in_features if moe.shared_expert is not None else None,
        "bias": moe.experts.down_proj_bias is not None,
    }
    if not spec.has_shared:
        want["shared_d_ff"] = None
    if type(router) is not TopK or router.scale != 1.0 or router.capacity_factor is not None:
        raise ValueError(f"{who}: transformers blocks route with plain top-k (moekit's TopK without scale or "
                         f"capacity); this layer's router is {router!r}")
    diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if diff:
        detail = ", ".join(f"{k}: layer={a} block={b}" for k, (a, b) in diff.items())
        raise ValueError(f"{who}: the layer does not match the {type(like).__name__} template ({detail})")
    if spec.has_shared and moe.shared_expert_gate is None:
        raise ValueError(f"{who}: {type(like).__name__} has a gated shared expert; the layer has no shared_expert_gate")


def to_hf(moe: MoE, like: nn.Module) -> nn.Module:
    """A transformers block of ``like``'s type and shape holding ``moe``'s weights.

    ``like`` is a template (an existing block of the target model, or one built from its config);
    it is copied, not changed. The layer must have the block's shape: experts, widths, k,
    renormalisation and shared expert (:func:`check_block`).
    """
    check_block(moe, like)
    block = copy.deepcopy(like)
    block.load_state_dict({k: v.detach().clone() for k, v in moe.state_dict().items()}, strict=True, assign=True)
    block.train(moe.training)
    return block


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def patch_hf_model(model: nn.Module, balance: float | None = None, z_loss: float = 0.0,
                   backend: str | None = None) -> nn.Module:
    """Replace every supported sparse-MoE block of a transformers model by ``moekit.MoE``, in place.

    The weights are shared, not copied. ``balance=None`` takes ``router_aux_loss_coef * k`` from
    the model config (same scale as HF's loss; see the module docstring). Train with
    ``loss = out.loss + moekit.aux_loss(model)``. Returns the model.
    """
    names = [n for n, m in model.named_modules() if is_supported_block(m)]
    if not names:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Moe" in type(m).__name__ or "MoE" in type(m).__name__})
        raise ValueError(
            f"patch_hf_model: no supported MoE block in {type(model).__name__}"
            + (f" (found {kinds})" if kinds else "")
            + f"; supported blocks are {supported_blocks()}"
        )
    cfg = getattr(model, "config", None)
    coef = getattr(cfg, "router_aux_loss_coef", None)
    for name in names:
        block = model.get_submodule(name)
        b = balance if balance is not None else (coef * block.gate.top_k if coef is not None else 0.01)
        _set_submodule(model, name, from_hf(block, balance=b, z_loss=z_loss, backend=backend, copy_weights=False))
    if cfg is not None and getattr(cfg, "output_router_logits", False):
        # HF's own aux loss reads its router modules, which are gone; moekit.aux_loss replaces it.
        cfg.output_router_logits = False
    return model


def unpatch_hf_model(model: nn.Module) -> nn.Module:
    """Put transformers blocks back in place of the layers ``patch_hf_model`` installed, in place."""
    cfg = getattr(model, "config", None)
    for name, m in list(model.named_modules()):
        cls = getattr(m, "hf_block_class", None)
        if isinstance(m, MoE) and cls is not None:
            with torch.device("meta"):
                template = cls(getattr(cfg, "text_config", None) or cfg)
            _set_submodule(model, name, to_hf(m, like=template))
    return model
