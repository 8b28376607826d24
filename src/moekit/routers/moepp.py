"""MoE++ routing (Jin et al., ICLR 2025): top-k over FFN and zero-computation experts.

The router scores ``N = N_FFN + N_ZC`` experts: the layer's FFN experts first (ids ``[0, N_FFN)``),
then its zero, copy and constant experts (:class:`moekit.MoE` with ``zero_experts``,
``copy_experts``, ``constant_experts`` tells the router which ids are which). It adds to top-k:

- the **gating residual**: ``G_j(x) = W_j x + W_g G_{j-1}(x)``, ``W_g`` ``[N, N]`` without
  bias; ``G_{j-1}`` is the previous MoE layer's post-residual logits, the router context
  ``gate_residual`` (``[T, N]``; absent in the first MoE layer, where ``G_j(x) = W_j x``);
- the **heterogeneous load-balancing loss**, :func:`heterogeneous_balance_loss`;
- **per-kind capacities**, :meth:`MoEPP.capacities`.

What follows the paper, the official code (``moe_plus_plus_layer.py``) or is moekit's own is said at
each option of :class:`MoEPP`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.routers._registry import register_router
from moekit.routing import Router, Routing, count_per_expert, fp32

__all__ = ["MoEPP", "heterogeneous_balance_loss", "drop_over_capacities"]


def heterogeneous_balance_loss(probs_TN: Tensor, expert_A: Tensor, eta_N: Tensor) -> Tensor:
    """MoE++'s load-balancing loss ``L_b = sum_i eta_i f_i P_i``.

    ``f_i`` is the fraction of the ``T`` tokens that selected expert ``i`` (``expert_A`` lists the
    selections, before any capacity drop; a token selects an expert at most once), ``P_i`` the mean
    router probability of ``i`` and ``eta_i`` its weight (1 for an FFN expert, ``tau`` for a
    zero-computation one). Unlike :func:`moekit.routing.load_balancing_loss` there is no factor ``N``:
    a balanced top-k router scores ``k / N * mean(eta)``.
    """
    T, N = probs_TN.shape
    if T == 0:
        return probs_TN.sum() * 0.0
    f_N = count_per_expert(expert_A, N).to(probs_TN.dtype) / T
    return (eta_N.to(probs_TN.dtype) * f_N * probs_TN.mean(dim=0)).sum()


def drop_over_capacities(routing: Routing, capacity_N: Tensor) -> Routing:
    """Keep at most ``capacity_N[e]`` assignments of each expert ``e``, first come first served in the
    routing's order (token-major for top-k); the others are removed (the token skips that expert)
    and counted in ``Routing.dropped``. The surviving weights are not renormalised."""
    if routing.num_assignments == 0:
        return routing
    onehot_AN = F.one_hot(routing.expert, routing.num_experts)
    place_A = (onehot_AN.cumsum(dim=0) * onehot_AN).sum(dim=-1) - 1  # 0-based rank within its expert
    keep = place_A < capacity_N.to(place_A.device)[routing.expert]
    kept = int(keep.sum())
    if kept == routing.num_assignments:
        return routing
    return replace(routing, token=routing.token[keep], expert=routing.expert[keep], weight=routing.weight[keep],
                   dropped=routing.dropped + routing.num_assignments - kept)


def _linear_init(w: Tensor) -> Tensor:
    """``nn.Linear``'s default initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (the code's layers)."""
    return nn.init.kaiming_uniform_(w, a=math.sqrt(5))


@register_router("moepp")
class MoEPP(Router):
    """MoE++ router: softmax over the ``N`` experts in fp32, the ``k`` most probable per token.

    Args:
        k: experts per token (paper: top-2 in every layer).
        tau: ``τ``, the weight of a zero-computation expert in the balance loss and the share of
            tokens it is given by the capacities (paper; default 0.75 as the paper's 7B model).
        balance: ``β``, coefficient of :func:`heterogeneous_balance_loss` (``losses["balance"]``,
            training mode only). The paper does not give ``β``; 0.01 is moekit's choice (the
            coefficient of moekit's top-k balance loss).
        capacity_factor: ``γ``; ``None`` (default) is dropless. Otherwise an FFN expert takes at most
            ``ceil(γ τ T / (τ N_FFN + N_ZC))`` assignments and a zero-computation expert
            ``ceil(γ T / (τ N_FFN + N_ZC))`` (paper; the rounding up is moekit's), in token
            order; the rest are dropped. The capacities add up to ``γ T`` (the paper's formula has no
            ``k``): ``γ = k`` fits a balanced top-k load.
        residual: the gating residual ``W_g`` (paper and code); ``False`` routes on ``W x`` alone.
            ``W_g`` starts as ``nn.Linear``'s default, as the code's ``gate_map``.
        renormalize_zero: the code's gating: the zero experts' weights set to 0 and the k weights
            renormalised to sum 1 (a token choosing a zero and an FFN expert gives that FFN its full
            output). ``False`` (default, the paper): the weights are the chosen softmax
            probabilities, unnormalised, and a zero expert's share of the output is lost.
        mlp: the code's router ``D -> 8N -> tanh -> N`` (bias-free, fp32; ``hidden_weight``
            ``[8N, D]``, ``weight`` ``[N, 8N]``). ``False`` (default, the paper): one linear map,
            ``weight`` ``[N, D]``. Both start as ``nn.Linear``'s default (the code's).

    Not offered: the code multiplies the experts' input by ``k`` unless ``moe_feature_no_mul_topk``
    (an in-place side effect the paper does not describe). ``Routing.logits`` holds the
    post-residual logits, which a model passes to the next MoE layer as ``gate_residual``.
    """

    name = "moepp"

    def __init__(self, k: int = 2, tau: float = 0.75, balance: float = 0.01, capacity_factor: float | None = None,
                 residual: bool = True, renormalize_zero: bool = False, mlp: bool = False) -> None:
        super().__init__()
        check_number("k", k, lo=1, integer=True, owner="MoEPP")
        check_number("tau", tau, lo=0, lo_open=True, owner="MoEPP")
        check_number("balance", balance, lo=0, owner="MoEPP")
        if capacity_factor is not None:
            check_number("capacity_factor", capacity_factor, lo=0, lo_open=True, owner="MoEPP")
        self.k, self.tau, self.balance, self.capacity_factor = k, tau, balance, capacity_factor
        self.residual, self.renormalize_zero, self.mlp = bool(residual), bool(renormalize_zero), bool(mlp)
        self.context_keys = ("gate_residual",) if self.residual else ()
        self.kinds = (0, 0, 0, 0)

    def extra_repr(self) -> str:
        ffn, zero, copy, const = self.kinds
        return (f"k={self.k}, tau={self.tau}, balance={self.balance}, capacity_factor={self.capacity_factor}, "
                f"residual={self.residual}, renormalize_zero={self.renormalize_zero}, mlp={self.mlp}, "
                f"ffn={ffn}, zero={zero}, copy={copy}, constant={const}")

    def check_num_experts(self, num_experts: int) -> None:
        if self.k > num_experts:
            raise ValueError(f"MoEPP: k={self.k} must be <= the number of experts {num_experts} (all kinds)")

    def build(self, d_model: int, num_experts: int) -> None:
        N = num_experts
        if self.mlp:
            self.hidden_weight = nn.Parameter(_linear_init(torch.empty(8 * N, d_model)))
        self.weight = nn.Parameter(_linear_init(torch.empty(N, 8 * N if self.mlp else d_model)))
        self.residual_weight = nn.Parameter(_linear_init(torch.empty(N, N))) if self.residual else None
        self.kinds = (N, 0, 0, 0)

    def set_expert_kinds(self, ffn: int, zero: int = 0, copy: int = 0, constant: int = 0) -> None:
        """Which of the bound experts are FFN (ids first), zero, copy and constant ones; until told, all
        are FFN experts. Called by :class:`moekit.MoE`."""
        self._require_bound()
        if ffn + zero + copy + constant != self.num_experts:
            raise ValueError(f"MoEPP: {ffn} FFN + {zero} zero + {copy} copy + {constant} constant experts do not "
                             f"add up to the {self.num_experts} experts the router is bound to")
        self.kinds = (ffn, zero, copy, constant)

    @property
    def num_ffn(self) -> int:
        return self.kinds[0]

    def eta(self, device=None) -> Tensor:
        """``[N]``: the balance-loss weight of each expert, 1 (FFN) or ``tau`` (zero-computation)."""
        eta_N = torch.full((self.num_experts,), float(self.tau), device=device)
        eta_N[: self.num_ffn] = 1.0
        return eta_N

    def capacities(self, num_tokens: int) -> Tensor | None:
        """``[N]`` int64 assignments each expert may take for ``num_tokens`` tokens, or
        ``None`` without ``capacity_factor``."""
        if self.capacity_factor is None:
            return None
        denom = self.tau * self.num_ffn + (self.num_experts - self.num_ffn)
        c_ffn = math.ceil(self.capacity_factor * self.tau * num_tokens / denom)
        c_zc = math.ceil(self.capacity_factor * num_tokens / denom)
        cap_N = torch.full((self.num_experts,), c_zc, dtype=torch.int64)
        cap_N[: self.num_ffn] = c_ffn
        return cap_N

    def logits(self, x_TD: Tensor, gate_residual: Tensor | None = None) -> Tensor:
        """``[T, N]`` fp32 post-residual logits ``W x (+ W_g gate_residual)``."""
        with fp32(x_TD):
            h = x_TD.float()
            if self.mlp:
                h = torch.tanh(F.linear(h, self.hidden_weight.float()))
            out = F.linear(h, self.weight.float())
            if gate_residual is not None:
                out = out + F.linear(gate_residual.float(), self.residual_weight.float())
            return out

    def _check_residual(self, gate_residual: Tensor | None, num_tokens: int) -> None:
        if gate_residual is None:
            return
        if not self.residual:
            raise ValueError("MoEPP: got a gate_residual but the router was built with residual=False; "
                             "build it with residual=True or do not pass gate_residual")
        if not isinstance(gate_residual, Tensor) or gate_residual.shape != (num_tokens, self.num_experts):
            shape = tuple(gate_residual.shape) if isinstance(gate_residual, Tensor) else type(gate_residual).__name__
            raise ValueError(f"MoEPP: gate_residual must be the previous MoE layer's logits [{num_tokens}, "
                             f"{self.num_experts}], got {shape}; the MoE layers it links need the same number "
                             "of experts (all kinds)")

    def forward(self, x_TD: Tensor, gate_residual: Tensor | None = None, **context) -> Routing:
        self._require_bound()
        T = x_TD.shape[0]
        self._check_residual(gate_residual, T)
        logits_TN = self.logits(x_TD, gate_residual)
        probs_TN = torch.softmax(logits_TN, dim=-1)
        top_p_TK, top_i_TK = torch.topk(probs_TN, self.k, dim=-1)
        if self.renormalize_zero:
            zero = self.num_ffn + self.kinds[1]
            is_zero = (top_i_TK >= self.num_ffn) & (top_i_TK < zero)
            top_p_TK = top_p_TK.masked_fill(is_zero, 0.0)
            top_p_TK = top_p_TK / top_p_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(top_p_TK.dtype).tiny)
        routing = Routing.from_topk(top_i_TK, top_p_TK, self.num_experts, logits=logits_TN, requested=T * self.k)
        if self.training and self.balance:
            eta_N = self.eta(logits_TN.device)
            routing.losses["balance"] = self.balance * heterogeneous_balance_loss(probs_TN, routing.expert, eta_N)
        cap_N = self.capacities(T)
        if cap_N is not None:
            routing = drop_over_capacities(routing, cap_N)
        return routing
