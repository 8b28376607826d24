"""The routing contract shared by every router, dispatcher and expert backend.

A :class:`Routing` is a flat list of ``N`` assignments ``(token, expert, weight)``. Fixed top-k,
ragged dynamic-k, expert choice, soft selection and all-experts-on routing all have this one
shape, so the dispatcher and the experts never need to know which router produced it.

Shape legend used in names: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per
token, ``N`` assignments.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Routing",
    "Router",
    "count_per_expert",
    "load_balancing_loss",
    "router_z_loss",
    "fp32",
]


def count_per_expert(expert_N: Tensor, num_experts: int) -> Tensor:
    """``[E]`` int64: how many entries of ``expert_N`` name each expert. ``torch.bincount`` with a size
    fixed by ``num_experts`` (bincount's own size depends on the values, which splits a compiled graph)."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_N.device)
    return counts.scatter_add_(0, expert_N, torch.ones_like(expert_N, dtype=torch.int64))


@dataclass
class Routing:
    """Who goes where, with which weight, and which auxiliary losses.

    Attributes:
        token: ``[N]`` int64, row of the flattened input ``x[T, D]``.
        expert: ``[N]`` int64, expert id in ``[0, num_experts)``.
        weight: ``[N]`` float, combine weight; carries the router's gradient.
        num_tokens: ``T``.
        num_experts: ``E``.
        losses: named auxiliary losses, already multiplied by their coefficients.
        logits: optional ``[T, E]`` router logits (fp32), for statistics and replay.
        dropped: number of assignments removed by a capacity limit.
        requested: number of assignments the router wanted before any drop (``T * k`` for top-k).
        k_per_token: optional ``[T]`` int64, each token's number of experts when it varies by token
            (DA-MoE's dynamic k).
        importance: optional ``[T]`` per-token importance the routing was computed from (DA-MoE).
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    num_tokens: int
    num_experts: int
    losses: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    dropped: int = 0
    requested: int | None = None
    k_per_token: Tensor | None = None
    importance: Tensor | None = None

    @property
    def num_assignments(self) -> int:
        return int(self.token.numel())

    @classmethod
    def from_topk(
        cls,
        indices_TK: Tensor,
        weights_TK: Tensor,
        num_experts: int,
        **extra,
    ) -> Routing:
        """Build a Routing from dense ``[T, K]`` expert ids and weights (token-major order)."""
        T, K = indices_TK.shape
        token = torch.arange(T, device=indices_TK.device).repeat_interleave(K)
        return cls(
            token=token,
            expert=indices_TK.reshape(-1).long(),
            weight=weights_TK.reshape(-1),
            num_tokens=T,
            num_experts=num_experts,
            **extra,
        )

    def counts(self) -> Tensor:
        """Assignments per expert, ``[E]`` int64."""
        return count_per_expert(self.expert, self.num_experts)

    def experts_per_token(self) -> Tensor:
        """Number of experts each token was sent to, ``[T]`` int64."""
        return torch.bincount(self.token, minlength=self.num_tokens)

    def detach(self) -> Routing:
        """A copy without autograd history (for statistics, traces and replay)."""
        return Routing(
            token=self.token,
            expert=self.expert,
            weight=self.weight.detach(),
            num_tokens=self.num_tokens,
            num_experts=self.num_experts,
            losses={k: v.detach() for k, v in self.losses.items()},
            logits=None if self.logits is None else self.logits.detach(),
            dropped=self.dropped,
            requested=self.requested,
            k_per_token=self.k_per_token,
            importance=None if self.importance is None else self.importance.detach(),
        )

    def validate(self, num_tokens: int | None = None, num_experts: int | None = None,
                 check_finite: bool = False) -> None:
        """Raise ValueError if the routing is malformed or does not fit the given sizes; with
        ``check_finite``, also if a weight is NaN or inf (one reduction)."""
        if num_tokens is not None and self.num_tokens != num_tokens:
            raise ValueError(
                f"routing: num_tokens={self.num_tokens} but the input has {num_tokens} tokens; "
                "pass a Routing computed for this input (same flattened leading dims)"
            )
        if num_experts is not None and self.num_experts != num_experts:
            raise ValueError(
                f"routing: num_experts={self.num_experts} but the layer has {num_experts} experts"
            )
        n = self.token.numel()
        if self.expert.numel() != n or self.weight.numel() != n:
            raise ValueError(
                "routing: token, expert and weight must have the same length, got "
                f"{n}, {self.expert.numel()}, {self.weight.numel()}"
            )
        if self.token.dtype != torch.int64 or self.expert.dtype != torch.int64:
            raise TypeError(
                f"routing: token and expert must be int64, got {self.token.dtype} and {self.expert.dtype}"
            )
        if n:
            lo, hi = int(self.expert.min()), int(self.expert.max())
            if lo < 0 or hi >= self.num_experts:
                raise ValueError(
                    f"routing: expert ids must lie in [0, {self.num_experts}), got range [{lo}, {hi}]"
                )
            lo, hi = int(self.token.min()), int(self.token.max())
            if lo < 0 or hi >= self.num_tokens:
                raise ValueError(
                    f"routing: token ids must lie in [0, {self.num_tokens}), got range [{lo}, {hi}]"
                )
            bad = int((~torch.isfinite(self.weight.detach())).sum()) if check_finite else 0
            if bad:
                raise ValueError(
                    f"routing: the weights contain NaN or inf ({bad} of {n}); fix what computed them, "
                    "or pass check_finite=False (to the MoE layer) to skip this check"
                )


# ----------------------------------------------------------------------------------- losses


def load_balancing_loss(probs_TE: Tensor, expert_N: Tensor, num_assignments: int | None = None) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the router's requested assignments that went to expert ``e``
    (counted before any capacity drop) and ``P_e`` the mean router probability of ``e``. The
    value is 1.0 for a perfectly balanced router whatever ``k`` is. (Hugging Face's
    ``load_balancing_loss_func`` counts ``f_e`` per token instead of per assignment, so its value
    is ``k`` times this one.)
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    n = num_assignments if num_assignments is not None else expert_N.numel()
    f_E = count_per_expert(expert_N, E).to(probs_TE.dtype) / max(n, 1)
    P_E = probs_TE.mean(dim=0)
    return E * torch.dot(f_E, P_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)**2``."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def entropy(probs_TE: Tensor) -> Tensor:
    """Mean entropy (nats) of the per-token router distributions."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()


# ----------------------------------------------------------------------------------- router base


def fp32(x: Tensor):
    """A context in which ``torch.autocast`` (if on for ``x``'s device) is off: routers compute their
    scores in fp32 whatever the precision of the experts around them."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


class Router(nn.Module):
    """Base class of every router.

    A router is built without knowing the layer it will serve (``TopK(k=2)``); the MoE layer
    calls :meth:`bind` with the model width and the number of experts, which creates the
    router's parameters. ``forward(x[T, D], **context) -> Routing``; context is explicit and
    optional (``token_ids``, ``importance``, ``task``...). Routers never touch expert weights.
    """

    #: name in the router registry (set by ``register_router``)
    name: str = "router"
    #: context the router needs from the model (e.g. ``("importance",)``, ``("token_ids",)``);
    #: models such as ``moekit.models.GPT`` compute and pass exactly these.
    context_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.d_model: int | None = None
        self.num_experts: int | None = None

    @property
    def bound(self) -> bool:
        return self.num_experts is not None

    def bind(self, d_model: int, num_experts: int) -> Router:
        """Attach to a layer of width ``d_model`` with ``num_experts`` experts; build parameters."""
        if self.bound:
            if (self.d_model, self.num_experts) != (d_model, num_experts):
                raise ValueError(
                    f"{type(self).__name__} is already bound to d_model={self.d_model}, "
                    f"num_experts={self.num_experts}; got d_model={d_model}, num_experts={num_experts}. "
                    "Use a fresh router instance for each layer"
                )
            return self
        self.check_num_experts(num_experts)
        self.d_model, self.num_experts = d_model, num_experts
        self.build(d_model, num_experts)
        return self

    def check_num_experts(self, num_experts: int) -> None:
        """Raise ValueError if this router cannot serve ``num_experts`` experts."""

    def build(self, d_model: int, num_experts: int) -> None:
        """Create parameters (called once by :meth:`bind`)."""

    def _require_bound(self) -> None:
        if not self.bound:
            raise RuntimeError(
                f"{type(self).__name__} is not bound to a layer yet: pass it to moekit.MoE(..., router=...) "
                "or call router.bind(d_model, num_experts)"
            )


class LinearRouter(Router):
    """A router whose scores are one bias-free linear map of the input, computed in fp32.

    The weight is ``[E, D]`` and named ``weight`` (the Mixtral/Qwen/OLMoE layout).
    """

    def build(self, d_model: int, num_experts: int) -> None:
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, x_TD: Tensor) -> Tensor:
        with fp32(x_TD):
            return F.linear(x_TD.float(), self.weight.float())
