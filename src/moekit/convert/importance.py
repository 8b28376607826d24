"""Token importance from a converted encoder's attention, for the routers that ask for it (DA-MoE).

DA-MoE (Akhavan Aghdam et al., arXiv 2409.06669) gives a token more experts the more important it
is, with importance taken from the attention; the paper's method body is not public, so both
signals below and their normalisation are **our design** (papers.md §5.2). For a Hugging Face
BERT/RoBERTa encoder converted by ``moekit.convert`` (``partition``, ``upcycle``...) with a router
whose ``context_keys`` include ``"importance"`` (``dynamic_k``), :func:`attach_importance` hands
each such MoE layer the importance computed from the self-attention probabilities ``A_h`` of the
same layer (the sublayer right before the FFN), in the same forward:

- ``"received"``: the attention token ``t`` receives, ``ι_t = mean_h Σ_q A_h[q, t] / n`` over the
  ``n`` valid (non-padding) queries ``q``, normalised per sequence as a multiple of uniform
  attention: ``ι̂_t = n · ι_t = mean_h Σ_q A_h[q, t]``. Every valid query spreads a mass of 1 over
  the valid keys, so ``ι̂`` averages exactly 1 over a sequence's valid tokens whatever its length,
  and uniform attention gives 1 to every token.
- ``"paid"``: the attention the token pays itself, also relative to uniform attention over its
  ``n`` valid keys: ``n · mean_h A_h[t, t]`` (the signal moekit's causal GPT uses).

Padding tokens (those the attention mask hides from the queries) get importance 0, so a dynamic-K
router gives them its ``k_min``. The probabilities come from the attention itself, which needs the
eager implementation (SDPA and flash kernels return none): load the model with
``attn_implementation="eager"`` or call ``model.set_attn_implementation("eager")``. In training the
eager probabilities carry attention dropout; the importance is computed from what the layer used.

The path is :class:`~moekit.convert.build.RoutingContext`: a forward hook on each attention
module writes the importance into the context of the converted FFN of its layer, which consumes it.
:func:`attach_importance` returns a handle whose ``remove()`` takes the hooks off and restores the
layers' previous contexts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.convert.build import ConvertedFFN, RoutingContext, context_keys_of
from moekit.convert.ffn import FFNSite, family_of, find_ffns

__all__ = ["IMPORTANCE_SIGNALS", "attention_importance", "valid_tokens", "attach_importance", "ImportanceHandle"]

IMPORTANCE_SIGNALS = ("received", "paid")
_MARK = "moekit_importance_signal"  # set on an attention module while a hook of ours is on it


def _check_signal(signal: str) -> None:
    if signal not in IMPORTANCE_SIGNALS:
        raise ValueError(f"importance signal must be one of {list(IMPORTANCE_SIGNALS)}, got {signal!r}")


def valid_tokens(attention_mask: Tensor | None, batch: int, length: int) -> Tensor:
    """``[B, T]`` bool: the tokens queries may attend to, from a Hugging Face attention mask as the
    attention module receives it (``None``: all; ``[B, T]`` 0/1; ``[B, 1|H, Q, T]`` boolean with
    True = attend, or additive float with 0 = attend and a large negative value = masked)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool)
    m = attention_mask
    if m.dtype == torch.bool:
        allowed = m
    elif m.is_floating_point() and m.dim() == 4:
        allowed = m > torch.finfo(m.dtype).min / 2
    else:
        allowed = m != 0
    if allowed.dim() == 4:
        allowed = allowed.any(dim=-2).any(dim=1)
    if allowed.dim() != 2 or allowed.shape[-1] != length:
        raise ValueError(f"valid_tokens: an attention mask of shape {tuple(attention_mask.shape)} does not fit "
                         f"{batch} sequences of {length} tokens")
    return allowed.expand(batch, length)


def attention_importance(probs: Tensor, valid: Tensor | None = None, signal: str = "received") -> Tensor:
    """``[B, T]`` importance from self-attention probabilities ``probs [B, H, T, T]`` (query rows, key
    columns) and the valid tokens ``valid [B, T]`` (``None``: all); see the module docstring for
    the two signals. Padding tokens get 0."""
    _check_signal(signal)
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"attention_importance: probs must be [B, H, T, T] self-attention probabilities over whole "
                         f"sequences, got shape {tuple(probs.shape)}")
    B, _, T, _ = probs.shape
    p = probs.detach().float()
    v = torch.ones(B, T, device=p.device) if valid is None else valid.to(device=p.device, dtype=p.dtype)
    if v.shape != (B, T):
        raise ValueError(f"attention_importance: valid must be [{B}, {T}], got {tuple(v.shape)}")
    if signal == "received":
        imp = (p * v[:, None, :, None]).sum(dim=-2).mean(dim=1)  # mass from valid queries, mean over heads
    else:
        imp = p.diagonal(dim1=-2, dim2=-1).mean(dim=1) * v.sum(dim=-1, keepdim=True)
    return imp * v


class _ImportanceHook:
    """Forward hook (with kwargs) on an attention module: puts the importance of its output
    probabilities in ``context``. An object rather than a closure, so that a deep copy of the model
    gets hooks writing to the copy's contexts."""

    def __init__(self, context: RoutingContext, signal: str) -> None:
        self.context, self.signal = context, signal

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(probs, Tensor):
            raise RuntimeError("attach_importance: the attention returned no probabilities; keep the model on "
                               "attn_implementation='eager' while importance is attached")
        B, _, T, S = probs.shape
        if T != S:
            raise RuntimeError(f"attach_importance: {T} queries attend to {S} keys (a cache or cross-attention); "
                               "importance needs self-attention over whole sequences")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        with torch.no_grad():
            valid = valid_tokens(mask, B, T).to(probs.device)
            self.context.importance = attention_importance(probs, valid, self.signal).reshape(-1)


def _bert_attention(model: nn.Module, site: FFNSite) -> nn.Module:
    return model.get_submodule(site.name.rpartition(".")[0]).attention.self


# family name -> the self-attention module (returning ``(output, probabilities)``) of a site's layer
_ATTENTION: dict[str, Callable[[nn.Module, FFNSite], nn.Module]] = {"bert": _bert_attention}


class ImportanceHandle:
    """What :func:`attach_importance` returns: ``remove()`` takes its hooks off and gives every layer
    back its previous routing context."""

    def __init__(self) -> None:
        self.hooks: list = []
        self.attention: list[nn.Module] = []
        self.previous: list[tuple[ConvertedFFN, RoutingContext | None]] = []

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        for attn in self.attention:
            if hasattr(attn, _MARK):
                delattr(attn, _MARK)
        for layer, context in self.previous:
            layer.context = context
        self.hooks, self.attention, self.previous = [], [], []


def _check_model(model: nn.Module) -> str:
    family = family_of(model).name
    if family not in _ATTENTION:
        raise ValueError(f"attach_importance: supported for {sorted(_ATTENTION)} encoders, not the {family!r} family "
                         "(moekit.models.GPT computes its own importance)")
    config = model.config
    if getattr(config, "is_decoder", False):
        raise ValueError("attach_importance: needs a bidirectional encoder; this model is configured as a decoder "
                         "(is_decoder=True)")
    impl = getattr(config, "_attn_implementation", None)
    if impl != "eager":
        raise ValueError(f"attach_importance: the attention runs as {impl!r}, which returns no probabilities; load "
                         "the model with attn_implementation='eager' or call model.set_attn_implementation('eager')")
    return family


def attach_importance(model: nn.Module, signal: str = "received") -> ImportanceHandle:
    """Give every converted layer of ``model`` whose router asks for ``importance`` the importance
    (``signal``: ``"received"`` or ``"paid"``) of the same layer's self-attention, on every forward
    until ``remove()`` is called on the returned handle."""
    _check_signal(signal)
    family = _check_model(model)
    handle = ImportanceHandle()
    for site in find_ffns(model):
        layer = site.current()
        if not isinstance(layer, ConvertedFFN) or "importance" not in context_keys_of(layer.ffn):
            continue
        attn = _ATTENTION[family](model, site)
        if hasattr(attn, _MARK):
            handle.remove()
            raise ValueError(f"attach_importance: importance ({getattr(attn, _MARK)!r}) is already attached to "
                             f"{site.name}; call remove() on the handle attach_importance returned first")
        handle.previous.append((layer, layer.context))
        layer.context = layer.context or RoutingContext()
        handle.hooks.append(attn.register_forward_hook(_ImportanceHook(layer.context, signal), with_kwargs=True))
        handle.attention.append(attn)
        setattr(attn, _MARK, signal)
    if not handle.hooks:
        raise ValueError("attach_importance: no converted layer's router asks for importance; convert with a router "
                         "that does, e.g. router='dynamic_k'")
    return handle
