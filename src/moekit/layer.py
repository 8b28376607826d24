"""The MoE layer: router -> dispatch -> experts -> combine (+ an optional shared expert).

``MoE`` is a drop-in FFN, ``[..., D] -> [..., D]``, so it can replace an MLP inside any model,
Hugging Face ones included. Its parameter names follow the Hugging Face v5 MoE blocks
(``gate.weight``, ``experts.gate_up_proj``, ``experts.down_proj``, ``shared_expert.*``,
``shared_expert_gate.weight``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.dispatch import LocalDispatcher
from moekit.experts import GroupedExperts, get_activation
from moekit.routers import build_router
from moekit.routing import Router, Routing, entropy

__all__ = ["MoE", "FFN", "aux_loss", "routing_stats", "RoutingStats"]


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

    ``moe(x, routing=r)`` uses a precomputed :class:`Routing` (pre-gating, replay) instead of the
    router. Extra keyword arguments are context for the router (``token_ids``, ``importance``...).
    The Routing of the last forward is kept in ``moe.last_routing``; read losses and statistics
    with :func:`moekit.aux_loss` and :func:`moekit.routing_stats`.

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
    ) -> None:
        super().__init__()
        check_number("d_model", d_model, lo=1, integer=True, owner="MoE")
        check_number("d_ff", d_ff, lo=1, integer=True, owner="MoE")
        check_number("num_experts", num_experts, lo=1, integer=True, owner="MoE")
        if shared_d_ff is not None:
            check_number("shared_d_ff", shared_d_ff, lo=1, integer=True, owner="MoE")
        if shared_gate and shared_d_ff is None:
            raise ValueError("MoE: shared_gate=True needs a shared expert; pass shared_d_ff")
        get_activation(activation)
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.gate = build_router(router).bind(d_model, num_experts)
        self.experts = GroupedExperts(num_experts, d_model, d_ff, activation, bias, backend)
        self.shared_expert = FFN(d_model, shared_d_ff, activation, bias) if shared_d_ff else None
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        self.check_finite = check_finite
        self.dispatcher = LocalDispatcher()
        self.last_routing: Routing | None = None

    @property
    def router(self) -> Router:
        return self.gate

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}"

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
            routing.validate(x_TD.shape[0], self.num_experts, check_finite=self.check_finite)
        x_ND, seg, ctx = self.dispatcher.dispatch(x_TD, routing)
        y_TD = self.dispatcher.combine(self.experts(x_ND, seg), ctx)
        if self.shared_expert is not None:
            s_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                s_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        self.last_routing = routing
        return y_TD.reshape(x.shape)


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
    mean_experts_per_token: float  # assignments with a non-zero weight per token
    router_entropy: float | None  # mean entropy (nats) of the router's softmax, if it has logits
    dead_experts: list[int]  # experts that received no token
    load_imbalance: float  # max / mean assignments per expert (1.0 = perfectly balanced)
    losses: dict[str, float]

    def as_dict(self) -> dict:
        return asdict(self)


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Per MoE layer (keyed by module name): load, drops, experts per token, entropy, dead experts."""
    out: dict[str, RoutingStats] = {}
    for name, _, r in _routed_modules(model):
        used = r.weight.detach() != 0  # assignments computed only for a gradient (e.g. STE) do not count
        counts = torch.bincount(r.expert[used], minlength=r.num_experts).tolist()
        n = sum(counts)
        requested = r.requested if r.requested is not None else n + r.dropped
        mean = n / max(len(counts), 1)
        ent = None
        if r.logits is not None and r.logits.shape[0]:
            ent = float(entropy(torch.softmax(r.logits.detach().float(), dim=-1)))
        out[name] = RoutingStats(
            num_tokens=r.num_tokens,
            tokens_per_expert=counts,
            dropped_fraction=r.dropped / requested if requested else 0.0,
            mean_experts_per_token=n / r.num_tokens if r.num_tokens else 0.0,
            router_entropy=ent,
            dead_experts=[e for e, c in enumerate(counts) if c == 0],
            load_imbalance=max(counts) / mean if mean > 0 else 0.0,
            losses={k: float(v.detach()) for k, v in r.losses.items()},
        )
    return out
