"""The MoE layer: router -> dispatch -> experts -> combine (+ an optional shared expert).

``MoE`` is a drop-in FFN, ``[..., D] -> [..., D]``, so it can replace an MLP inside any model,
Hugging Face ones included. Its parameter names follow the Hugging Face v5 MoE blocks
(``gate.weight``, ``experts.gate_up_proj``, ``experts.down_proj``, ``shared_expert.*``,
``shared_expert_gate.weight``). MoE++'s zero-computation experts (Jin et al., ICLR 2025) are
:class:`ZeroComputationExperts` (``zc_experts.*``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.dispatch import DispatchContext, LocalDispatcher, weighted_scatter
from moekit.experts import GroupedExperts, get_activation
from moekit.routers import MoEPP, build_router
from moekit.routing import Router, Routing, entropy

__all__ = ["MoE", "FFN", "ZeroComputationExperts", "aux_loss", "routing_stats", "RoutingStats"]


class FFN(nn.Module):
    """A dense FFN with the Llama/Qwen names: ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        self.act = get_activation(activation)
        self.activation = activation
        if self.act.gated:
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.act.gated:
            return self.down_proj(self.act.fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act.fn(self.up_proj(x)))


class ZeroComputationExperts(nn.Module):
    """MoE++'s zero-computation experts, applied elementwise to the tokens routed to them.

    Local ids: zero experts ``[0, Z)``, copy experts ``[Z, Z + C)``, constant experts after them.

    - zero: ``E(x) = 0``;
    - copy: ``E(x) = x``;
    - constant ``i``: ``E(x) = a1 x + a2 v_i`` with ``[a1, a2] = softmax(W_i x)``; ``W_i`` ``[2, D]``
      (``constant_gate[i]``, initialised as the code's ``nn.Linear(D, 2)``) and ``v_i`` ``[D]``
      (``constant[i]``, initialised ``N(0, 1)`` as the code).

    ``forward(x[T, D], routing) -> [T, D]``: the sum over the routing's assignments of
    ``weight * E(x[token])`` (differentiable in ``x``, the weights and the constant experts).
    """

    def __init__(self, d_model: int, zero: int = 0, copy: int = 0, constant: int = 0) -> None:
        super().__init__()
        self.d_model, self.num_zero, self.num_copy, self.num_constant = d_model, zero, copy, constant
        self.num_experts = zero + copy + constant
        self.constant_gate = nn.Parameter(torch.empty(constant, 2, d_model)) if constant else None
        self.constant = nn.Parameter(torch.empty(constant, d_model)) if constant else None
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"zero={self.num_zero}, copy={self.num_copy}, constant={self.num_constant}"

    def reset_parameters(self) -> None:
        if self.num_constant:
            bound = 1.0 / math.sqrt(self.d_model)
            nn.init.uniform_(self.constant_gate, -bound, bound)
            nn.init.normal_(self.constant)

    def own_init_parameters(self) -> list[nn.Parameter]:
        """The parameters a model must leave at this module's initialisation (the constant experts')."""
        return [self.constant_gate, self.constant] if self.num_constant else []

    def forward(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """Every assignment's ``E(x)`` from masks of fixed shape (no data-dependent sizes), then the
        weighted sum per token."""
        x_AD = x_TD.index_select(0, routing.token)
        e = routing.expert.unsqueeze(-1)
        first_const = self.num_zero + self.num_copy
        y_AD = ((e >= self.num_zero) & (e < first_const)).to(x_AD.dtype) * x_AD  # copy: x; zero: 0
        if self.num_constant:
            c_A = (routing.expert - first_const).clamp(0, self.num_constant - 1)
            a_A2 = torch.softmax(torch.einsum("ad,akd->ak", x_AD, self.constant_gate[c_A]), dim=-1)
            const_AD = a_A2[:, :1] * x_AD + a_A2[:, 1:] * self.constant[c_A]
            y_AD = y_AD + (e >= first_const).to(x_AD.dtype) * const_AD
        return weighted_scatter(y_AD, DispatchContext(routing.token, routing.weight, routing.num_tokens))


class MoE(nn.Module):
    """A mixture-of-experts FFN.

    Args:
        d_model: input and output width ``D``.
        d_ff: hidden width ``F`` of each expert.
        num_experts: ``E``.
        router: a :class:`moekit.routers.Router` instance (e.g. ``TopK(k=2)``) or a registered
            router name (``"topk"``, ``"expert_choice"``) built with its defaults.
        activation: ``"swiglu"`` (default), ``"geglu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"``.
        shared_d_ff: hidden width of an always-on shared expert (DeepSeek/Qwen2-MoE); ``None`` for none.
        shared_gate: scale the shared expert by ``sigmoid(x @ w)`` (Qwen2-MoE).
        bias: biases in the experts (and the shared expert).
        check_finite: raise on NaN/inf input, and on NaN/inf weights of a precomputed routing
            (one cheap reduction each); set ``False`` to skip.
        backend: force an expert backend (``"grouped_mm"``, ``"loop"``); ``None`` picks the best able one.
        zero_experts, copy_experts, constant_experts: MoE++'s zero-computation experts
            (:class:`ZeroComputationExperts`). The router scores ``num_experts`` FFN experts (ids
            first) then the zero, copy and constant ones; only the FFN assignments are dispatched to
            ``experts``, the others are applied elementwise with their routing weights. With all
            three 0 (default) the layer is a plain MoE. ``router="moepp"`` is MoE++'s router
            (:class:`moekit.routers.MoEPP`); any other router works over all the experts.

    ``moe(x, routing=r)`` uses a precomputed :class:`Routing` (pre-gating, replay) instead of the
    router. Extra keyword arguments are context for the router (``token_ids``, ``importance``...).
    The Routing of the last forward is kept in ``moe.last_routing``; read losses and statistics
    with :func:`moekit.aux_loss` and :func:`moekit.routing_stats`.

    With zero-computation experts, ``num_experts`` stays the number of FFN experts (the experts'
    shapes, compression, offloading and expert parallelism see only those), ``num_zc_experts``
    counts the others and the router is bound to both. ``last_routing`` is then the FFN part of the
    router's Routing (``num_experts`` FFN experts; with the router's losses, its logits over all the
    experts, and its ``dropped``/``requested`` counts over all kinds), and ``last_zc_routing`` the
    zero-computation part, with local ids (see :class:`ZeroComputationExperts`). A precomputed
    ``routing=`` names experts over all kinds. Splitting the routing reads how many assignments
    are FFN ones: under ``torch.compile`` the graph splits there.

    ``torch.compile(moe)`` equals the eager layer in outputs and gradients. The split sizes (rows
    per expert) are data-dependent, but the ``grouped_mm`` backend takes them as a device tensor,
    so with a router of fixed assignment count (``TopK`` without capacity, ``ExpertChoice``,
    ``Softmax``, ``SigmoidSTE`` in training) the forward is one graph with no graph break
    (``torch._dynamo.explain`` counts 0; ``fullgraph=True`` works). The ``loop`` backend slices
    rows per expert on the host: it runs eagerly between two graphs, one graph break. Routers
    whose number of assignments depends on the values (``TopK`` with ``capacity_factor``,
    ``DSelectK``, ``SigmoidSTE`` at inference) split the graph where they select them
    (``torch.nonzero``, boolean masks); ``DynamicK`` runs eagerly (one graph break); a
    precomputed ``routing=`` is validated on the host. A new routing reuses the compiled graphs
    (one recompile, to dynamic sizes, when the number of assignments changes). Under compile,
    ``check_finite`` runs inside the graph (``torch._assert_async``): a NaN/inf input raises a
    RuntimeError with the same message (on CUDA, a device-side assert). Under ``torch.autocast``,
    torch compiles the backward under the forward's autocast unless
    ``torch._functorch.config.backward_pass_autocast = "off"`` (eager's behaviour).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: Router | str = "topk",
        activation: str = "swiglu",
        shared_d_ff: int | None = None,
        shared_gate: bool = False,
        bias: bool = False,
        check_finite: bool = True,
        backend: str | None = None,
        zero_experts: int = 0,
        copy_experts: int = 0,
        constant_experts: int = 0,
    ) -> None:
        super().__init__()
        check_number("d_model", d_model, lo=1, integer=True, owner="MoE")
        check_number("d_ff", d_ff, lo=1, integer=True, owner="MoE")
        check_number("num_experts", num_experts, lo=1, integer=True, owner="MoE")
        if shared_d_ff is not None:
            check_number("shared_d_ff", shared_d_ff, lo=1, integer=True, owner="MoE")
        if shared_gate and shared_d_ff is None:
            raise ValueError("MoE: shared_gate=True needs a shared expert; pass shared_d_ff")
        for name, n in (("zero_experts", zero_experts), ("copy_experts", copy_experts),
                        ("constant_experts", constant_experts)):
            check_number(name, n, lo=0, integer=True, owner="MoE")
        get_activation(activation)
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.num_zc_experts = zero_experts + copy_experts + constant_experts
        self.zc_experts = None
        if self.num_zc_experts:
            self.zc_experts = ZeroComputationExperts(d_model, zero_experts, copy_experts, constant_experts)
        self.gate = build_router(router).bind(d_model, num_experts + self.num_zc_experts)
        if isinstance(self.gate, MoEPP):
            self.gate.set_expert_kinds(num_experts, zero_experts, copy_experts, constant_experts)
        self.experts = GroupedExperts(num_experts, d_model, d_ff, activation, bias, backend)
        self.shared_expert = FFN(d_model, shared_d_ff, activation, bias) if shared_d_ff else None
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        self.check_finite = check_finite
        self.dispatcher = LocalDispatcher()
        self.last_routing: Routing | None = None
        self.last_zc_routing: Routing | None = None

    @property
    def router(self) -> Router:
        return self.gate

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}" + (
            f", num_zc_experts={self.num_zc_experts}" if self.num_zc_experts else "")

    def own_init_parameters(self) -> list[nn.Parameter]:
        """The parameters a model must leave at this layer's initialisation (the constant experts')."""
        return [] if self.zc_experts is None else self.zc_experts.own_init_parameters()

    def _param_dtype(self) -> torch.dtype | None:
        """The dtype the expert matmuls need the input in: the experts' weights' (meta ones too), else
        the shared expert's; ``None`` (no check) for experts without floating weights, such as
        offloaded ones, which cast their weights to the input. The routers compute in fp32."""
        w = getattr(self.experts, "down_proj", None)
        if isinstance(w, Tensor) and w.is_floating_point():
            return w.dtype
        for mod in (self.experts, self.shared_expert):
            if mod is None:
                continue
            for t in (*mod.parameters(), *mod.buffers()):
                if t.is_floating_point():
                    return t.dtype
        return None

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"MoE: x must be a floating-point tensor, got dtype={x.dtype}; cast it with x.float()")
        want = self._param_dtype()
        if want is not None and x.dtype != want and not _autocast_on(x.device.type):
            raise TypeError(
                f"MoE: x has dtype {x.dtype} but the layer's weights are {want}; cast the input with "
                f"x.to({want}) or the layer with moe.to({x.dtype}) (or run under torch.autocast)"
            )
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoE: the last dim of x must be d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        if self.check_finite and x.numel():
            if torch.compiler.is_compiling():  # checked inside the graph: a host read would split it
                torch._assert_async(torch.isfinite(x).all(), _NON_FINITE)
            elif not bool(torch.isfinite(x).all()):
                raise ValueError(_NON_FINITE)

    def forward(self, x: Tensor, routing: Routing | None = None, **context) -> Tensor:
        self._check_input(x)
        x_TD = x.reshape(-1, self.d_model)
        if routing is None:
            routing = self.gate(x_TD, **context)
        else:
            routing.validate(x_TD.shape[0], self.num_experts + self.num_zc_experts, check_finite=self.check_finite)
        zc = None
        if self.zc_experts is not None:
            routing, zc = self._split(routing)
        x_ND, seg, ctx = self.dispatcher.dispatch(x_TD, routing)
        y_TD = self.dispatcher.combine(self.experts(x_ND, seg), ctx)
        if zc is not None:
            y_TD = y_TD + self.zc_experts(x_TD, zc)
        if self.shared_expert is not None:
            s_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                s_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        self.last_routing, self.last_zc_routing = routing, zc
        return y_TD.reshape(x.shape)

    def _split(self, routing: Routing) -> tuple[Routing, Routing]:
        """``(FFN part, zero-computation part)`` of a Routing over all the experts; the second with
        local ids ``expert - num_experts``."""
        E = self.num_experts
        zc = routing.expert >= E
        order = torch.argsort(zc.to(torch.int8), stable=True)  # FFN assignments first, each kind in its order
        n_ffn = routing.num_assignments - int(zc.sum())  # the one data-dependent size
        ffn, rest = order[:n_ffn], order[n_ffn:]
        ffn_part = replace(routing, token=routing.token[ffn], expert=routing.expert[ffn],
                           weight=routing.weight[ffn], num_experts=E)
        zc_part = Routing(token=routing.token[rest], expert=routing.expert[rest] - E, weight=routing.weight[rest],
                          num_tokens=routing.num_tokens, num_experts=self.num_zc_experts)
        return ffn_part, zc_part


_NON_FINITE = "MoE: x contains NaN or inf; fix the input (or the layer before), or pass check_finite=False to skip this check"


def _autocast_on(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``; older torch has only the CUDA/CPU switches."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled()) if device_type == "cuda" else False


# ----------------------------------------------------------------------------------- model-level readers


def _routed_modules(model: nn.Module):
    """``(name, module, routing)`` for every module whose ``last_routing`` is a Routing or a list of them.

    Each Routing once, named as in the uncompiled model: a ``torch.compile`` wrapper forwards attribute
    reads to the module it wraps (its ``_orig_mod``), which would otherwise be met twice.
    """
    seen: set[int] = set()
    for name, m in model.named_modules():
        name = ".".join(part for part in name.split(".") if part != "_orig_mod")
        r = getattr(m, "last_routing", None)
        if isinstance(r, Routing):
            found = [(name, r)]
        elif isinstance(r, (list, tuple)):
            found = [(f"{name}[{i}]" if name else f"[{i}]", ri) for i, ri in enumerate(r) if isinstance(ri, Routing)]
        else:
            continue
        for key, ri in found:
            if id(ri) not in seen:
                seen.add(id(ri))
                yield key, m, ri


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the auxiliary losses of every MoE layer's last forward (0 if there are none)."""
    total: Tensor | None = None
    for _, _, r in _routed_modules(model):
        for v in r.losses.values():
            total = v if total is None else total + v
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total


@dataclass
class RoutingStats:
    """Routing statistics of one layer's last forward."""

    num_tokens: int
    tokens_per_expert: list[int]
    dropped_fraction: float
    mean_experts_per_token: float  # FFN assignments with a non-zero weight per token
    router_entropy: float | None  # mean entropy (nats) of the router's softmax, if it has logits
    dead_experts: list[int]  # experts that received no token
    load_imbalance: float  # max / mean assignments per expert (1.0 = perfectly balanced)
    losses: dict[str, float]
    #: FFN assignments with a non-zero weight plus zero-computation assignments (any weight: a zero
    #: expert's is 0 under MoE++'s renormalize_zero), per token
    mean_all_experts_per_token: float = 0.0
    #: assignments per zero-computation expert (zero, copy, constant ids in order); empty without
    zc_tokens_per_expert: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Per MoE layer (keyed by module name): load, drops, experts per token, entropy, dead experts.
    For a layer with zero-computation experts, the load, dead experts and imbalance are its FFN
    experts'; ``mean_all_experts_per_token`` and ``zc_tokens_per_expert`` count the others too."""
    out: dict[str, RoutingStats] = {}
    for name, m, r in _routed_modules(model):
        used = r.weight.detach() != 0  # assignments computed only for a gradient (e.g. STE) do not count
        counts = torch.bincount(r.expert[used], minlength=r.num_experts).tolist()
        n = sum(counts)
        requested = r.requested if r.requested is not None else n + r.dropped
        mean = n / max(len(counts), 1)
        ent = None
        if r.logits is not None and r.logits.shape[0]:
            ent = float(entropy(torch.softmax(r.logits.detach().float(), dim=-1)))
        zc = getattr(m, "last_zc_routing", None)
        zc_counts = torch.bincount(zc.expert, minlength=zc.num_experts).tolist() if isinstance(zc, Routing) else []
        out[name] = RoutingStats(
            num_tokens=r.num_tokens,
            tokens_per_expert=counts,
            dropped_fraction=r.dropped / requested if requested else 0.0,
            mean_experts_per_token=n / r.num_tokens if r.num_tokens else 0.0,
            router_entropy=ent,
            dead_experts=[e for e, c in enumerate(counts) if c == 0],
            load_imbalance=max(counts) / mean if mean > 0 else 0.0,
            losses={k: float(v.detach()) for k, v in r.losses.items()},
            mean_all_experts_per_token=(n + sum(zc_counts)) / r.num_tokens if r.num_tokens else 0.0,
            zc_tokens_per_expert=zc_counts,
        )
    return out
