"""MC-MoE (Huang et al., ICLR 2025): pre-loading mixed-precision quantization of the experts (PMQ)
and online dynamic pruning (ODP).

PMQ, per MoE layer, from calibration data run through the model:

- ``phi_i = n_i / N``: the share of the ``N`` calibration tokens whose routing chose expert ``i``;
- ``w_i = sum p_{t,i} / N`` over those tokens, ``p`` the router's full softmax before any top-k
  renormalisation;
- ``eps_{i,j} = ||F(theta) - F(theta[e_i -> Q(e_i, j)])||_F``: the change of the layer's output on the
  cached calibration inputs when only expert ``i`` is quantized to ``j`` bits (:mod:`moekit.compress.quant`);
- the widths solve ``min sum_i phi_i^alpha w_i^beta eps_{i,j_i}^gamma`` subject to
  ``sum_i j_i = round(E * bits)`` and, where feasible, at least one expert at the highest allowed width
  and one at the second highest (:func:`allocate_bits`, an exact dynamic programme).

The experts are rounded to their widths by GPTQ (``quantizer="gptq"``, the default, as the paper;
:mod:`moekit.compress.gptq`) or by round-to-nearest (``"rtn"``); ``mcmoe(..., attention_bits=4)`` also
packs the attention projections (:class:`moekit.compress.quantized.QuantizedLinear`) as the paper does.

Allocation controls (``allocation=``): ``"pmq"``; ``"error"`` (``eps^gamma`` alone); ``"frequency"``
(``phi^alpha (2^-j)^gamma``: frequency with the width's nominal error); ``"uniform"`` (as even as
the budget allows); ``"random"`` (seeded). All meet the same bit budget.

Use: ``mcmoe(model, batches, bits=2.5)``; or ``m = MCMoE(...); m.calibrate(model, batches)`` then
``moekit.compress.compress(model, m, batches)`` (the registered name is ``"mc-moe"``). ODP:
``with_odp(model)`` (or ``with_odp(model, layers=[...])``) wraps each top-2 router in
:class:`moekit.routers.odp.ODP`, then ``calibrate_odp(model, batches)`` sets each layer's threshold to
its calibration median.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.compress.gptq import hessian
from moekit.compress.method import CompressionMethod, register_compression
from moekit.compress.quant import BITS, check_layout, dequantize, quantize
from moekit.compress.quantized import QuantizedExperts, QuantizedLinear, expert_ffn
from moekit.compress.stats import ExpertStats
from moekit.compress.surgery import sync_config
from moekit.io import read_json
from moekit.layer import MoE
from moekit.models.gpt import GPT, Attention, read_config, verify_model
from moekit.routers.odp import ODP, top2_ratio
from moekit.routers.topk import TopK

__all__ = ["ALLOCATIONS", "QUANTIZERS", "LayerCalibration", "MCMoE", "allocate_bits", "allocation_costs",
           "attention_linears", "calibrate_layers", "calibrate_odp", "expert_errors", "expert_hessians",
           "layer_hessians", "load_compressed", "mcmoe", "quantize_attention", "restore_attention", "save_compressed",
           "with_odp"]

ALLOCATIONS = ("pmq", "error", "frequency", "uniform", "random")
#: how weights are rounded to their widths: round-to-nearest or GPTQ
QUANTIZERS = ("rtn", "gptq")


@dataclass
class LayerCalibration:
    """One MoE layer on the calibration data: its inputs ``x [N, D]``, ``hits[E]`` tokens that chose
    each expert, ``mass[E]`` their summed full-softmax probability of it, ``num_tokens`` ``N``."""

    x: Tensor
    hits: Tensor
    mass: Tensor
    num_tokens: int

    @property
    def phi(self) -> Tensor:
        return self.hits.double() / max(self.num_tokens, 1)

    @property
    def w(self) -> Tensor:
        return self.mass / max(self.num_tokens, 1)


def _record(calib: dict, name: str, moe: MoE, x: Tensor) -> None:
    r = moe.last_routing
    if r.logits is None:
        raise ValueError(f"mc-moe: the router of {name or 'the model'} gives no logits; PMQ needs its softmax")
    p = torch.softmax(r.logits.detach().double(), dim=-1)
    used = r.weight.detach() != 0
    tok, ex = r.token[used], r.expert[used]
    E = moe.num_experts
    c = calib.setdefault(name, LayerCalibration([], torch.zeros(E, dtype=torch.long),
                                                torch.zeros(E, dtype=torch.float64), 0))
    c.x.append(x.detach().reshape(-1, moe.d_model))
    c.hits += torch.bincount(ex.cpu(), minlength=E)
    c.mass += torch.zeros(E, dtype=torch.float64).index_add_(0, ex.cpu(), p[tok, ex].cpu())
    c.num_tokens += r.num_tokens


def _run_hooked(model: nn.Module, moes: dict[str, nn.Module], hook: Callable, batches: Iterable,
                run: Callable[[nn.Module, object], object] | None) -> None:
    """Run ``batches`` through ``model`` in eval mode, calling ``hook(name, module, args)`` after each
    forward of the modules ``moes``."""
    handles = [m.register_forward_hook(lambda mod, args, _o, n=n: hook(n, mod, args)) for n, m in moes.items()]
    mode, forward = model.training, run or (lambda m, b: m(b))
    try:
        model.eval()
        for batch in batches:
            forward(model, batch)
    finally:
        model.train(mode)
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate_layers(model: nn.Module, batches: Iterable, run: Callable[[nn.Module, object], object] | None = None
                     ) -> dict[str, LayerCalibration]:
    """Per MoE layer (by module name), its cached inputs and routing statistics on ``batches``
    (``run(model, batch)``, default ``model(batch)``), in eval mode."""
    moes = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
    if not moes:
        raise ValueError("mc-moe: the model has no moekit.MoE layer to compress")
    calib: dict[str, LayerCalibration] = {}
    _run_hooked(model, moes, lambda n, mod, args: _record(calib, n, mod, args[0]), batches, run)
    if not calib:
        raise ValueError("mc-moe: no calibration batch reached an MoE layer; pass at least one batch")
    for c in calib.values():
        c.x = torch.cat(c.x)
    return calib


def _routed(moe: MoE, x_TD: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per expert of ``moe``, the rows of ``x`` its router (in eval mode) sends to it and their gate
    weights ``[n, 1]``, float32."""
    was = moe.training
    moe.eval()
    try:
        r = moe.gate(x_TD)
    finally:
        moe.train(was)
    out = []
    for i in range(moe.num_experts):
        sel = (r.expert == i) & (r.weight != 0)
        out.append((x_TD[r.token[sel]].float(), r.weight[sel].float().unsqueeze(1)))
    return out


@torch.no_grad()
def expert_errors(moe: MoE, x_TD: Tensor, widths: Sequence[int], group: int = 64) -> Tensor:
    """``[E, J]`` ``eps_{i,j}``: Frobenius norm of the change of ``moe``'s output on ``x`` when only
    expert ``i`` is quantized to ``widths[j]`` by round-to-nearest, whatever the quantizer of the final
    weights (as the official code does; the routing does not change: the router stays float)."""
    ex = moe.experts
    eps = torch.zeros(moe.num_experts, len(widths), dtype=torch.float64)
    for i, (xi, gi) in enumerate(_routed(moe, x_TD)):
        b1 = None if ex.first_bias is None else ex.first_bias[i].float()
        b2 = None if ex.down_proj_bias is None else ex.down_proj_bias[i].float()
        y = expert_ffn(xi, ex.first_proj[i].float(), b1, ex.down_proj[i].float(), b2, ex.act)
        for j, bits in enumerate(widths):
            w1, w2 = (dequantize(quantize(w[i], bits, group)) for w in (ex.first_proj, ex.down_proj))
            eps[i, j] = torch.linalg.norm(gi * (expert_ffn(xi, w1, b1, w2, b2, ex.act) - y)).double()
    return eps


@torch.no_grad()
def expert_hessians(moe: MoE, x_TD: Tensor) -> list[tuple[Tensor, Tensor] | None]:
    """Per expert of ``moe``, the GPTQ Hessians (:func:`moekit.compress.gptq.hessian`) of the inputs of its
    first projection (the rows of ``x`` routed to it) and of its down projection (its intermediate
    activations on them, with the float weights); ``None`` for an expert that no row reached."""
    ex = moe.experts
    out: list[tuple[Tensor, Tensor] | None] = []
    for i, (xi, _) in enumerate(_routed(moe, x_TD)):
        if xi.shape[0] == 0:
            out.append(None)
            continue
        h = xi @ ex.first_proj[i].float().t()
        if ex.first_bias is not None:
            h = h + ex.first_bias[i].float()
        out.append((hessian(xi), hessian(ex.act.apply(h))))
    return out


def allocation_costs(allocation: str, calib: LayerCalibration, eps: Tensor, widths: Sequence[int], bits: float,
                     alpha: float = 1.0, beta: float = 1.5, gamma: float = 2.0, seed: int = 0) -> Tensor:
    """``[E, J]`` cost of giving expert ``i`` width ``widths[j]`` under ``allocation`` (see the module doc)."""
    wid = torch.tensor(widths, dtype=torch.float64)
    E = eps.shape[0]
    if allocation == "pmq":
        return (calib.phi ** alpha * calib.w ** beta).unsqueeze(1) * eps ** gamma
    if allocation == "error":
        return eps ** gamma
    if allocation == "frequency":
        return (calib.phi ** alpha).unsqueeze(1) * (2.0 ** -wid) ** gamma
    if allocation == "uniform":
        return ((wid - bits) ** 2).expand(E, -1).clone()
    if allocation == "random":
        return torch.rand(E, len(widths), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    raise ValueError(f"mc-moe: allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def _dp(cost: Tensor, widths: Sequence[int], total: int) -> tuple[Tensor, Tensor, Tensor]:
    """Min-cost tables over experts x flags (bit 0: one at the highest width, bit 1: one at the second
    highest) x bits used; returns the final ``[4, total + 1]`` costs and the choices to backtrack."""
    E, J = cost.shape
    top = sorted(widths)[-2:]
    flag = [(1 if w == top[-1] else 0) | (2 if len(top) == 2 and w == top[0] else 0) for w in widths]
    inf = float("inf")
    dp = torch.full((4, total + 1), inf, dtype=torch.float64)
    dp[0, 0] = 0.0
    pick = torch.full((E, 4, total + 1), -1, dtype=torch.long)  # j * 4 + previous flags
    for i in range(E):
        new = torch.full_like(dp, inf)
        for f in range(4):
            for j, w in enumerate(widths):
                if w > total:
                    continue
                cand = dp[f, : total + 1 - w] + float(cost[i, j])
                f2 = f | flag[j]
                better = cand < new[f2, w:]
                new[f2, w:] = torch.where(better, cand, new[f2, w:])
                pick[i, f2, w:] = torch.where(better, torch.tensor(j * 4 + f), pick[i, f2, w:])
        dp = new
    return dp, pick, torch.tensor(flag)


def allocate_bits(cost: Tensor, widths: Sequence[int], total: int, protect: bool = True) -> list[int]:
    """The width of each expert minimising ``sum_i cost[i, j_i]`` with ``sum_i widths[j_i] == total``
    (exact). With ``protect``, at least one expert at the highest and one at the second-highest width,
    unless no allocation of that total can have them."""
    E = cost.shape[0]
    if len(set(widths)) != len(widths) or any(w not in BITS for w in widths):
        raise ValueError(f"mc-moe: widths must be distinct values of {BITS}, got {list(widths)}")
    if not min(widths) * E <= total <= max(widths) * E:
        raise ValueError(f"mc-moe: a budget of {total} bits cannot be met by {E} experts at widths {list(widths)}; "
                         f"the average bits must lie in [{min(widths)}, {max(widths)}]")
    dp, pick, _ = _dp(cost, widths, total)
    need = 3 if len(widths) >= 2 else 1
    f = need if protect and dp[need, total] < float("inf") else int(torch.argmin(dp[:, total]))
    out, s = [], total
    for i in range(E - 1, -1, -1):
        code = int(pick[i, f, s])
        j, f = divmod(code, 4)
        out.append(widths[j])
        s -= widths[j]
    return out[::-1]


@register_compression("mc-moe")
class MCMoE(CompressionMethod):
    """PMQ: each expert of each MoE layer quantized to the width :func:`allocate_bits` gives it.

    Settings: ``bits`` average width target (default 2.5), ``widths`` allowed widths (1, 2, 3), ``group``
    (64), ``alpha`` (1), ``beta`` (1.5), ``gamma`` (2), ``allocation`` (``"pmq"``, see
    :data:`ALLOCATIONS`), ``seed`` (for ``"random"``), ``quantizer``: how the experts' weights are
    rounded to their widths, ``"gptq"`` (the default, as the paper: GPTQ with ``damp`` (0.01), each
    expert's projections against the Hessians of its calibration inputs, :func:`expert_hessians`; an
    expert that got no calibration token falls back to round-to-nearest) or ``"rtn"`` (round-to-nearest).
    GPTQ is the default because it changes the layers' outputs far less at the same bytes (on a trained
    moekit GPT: a third of round-to-nearest's MoE-output error at 2 and 3 bits).
    The errors ``eps`` that steer the allocation are round-to-nearest's either way (:func:`expert_errors`).
    Needs :meth:`calibrate` before compressing.
    """

    def __init__(self, bits: float = 2.5, widths: Sequence[int] = (1, 2, 3), group: int = 64, alpha: float = 1.0,
                 beta: float = 1.5, gamma: float = 2.0, allocation: str = "pmq", seed: int = 0,
                 quantizer: str = "gptq", damp: float = 0.01) -> None:
        widths = tuple(sorted(int(w) for w in widths))
        if allocation not in ALLOCATIONS:
            raise ValueError(f"mc-moe: allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if quantizer not in QUANTIZERS:
            raise ValueError(f"mc-moe: quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        if not min(widths) <= bits <= max(widths):
            raise ValueError(f"mc-moe: bits={bits} must lie between the widths' {min(widths)} and {max(widths)}")
        super().__init__(bits=bits, widths=list(widths), group=group, alpha=alpha, beta=beta, gamma=gamma,
                         allocation=allocation, seed=seed, quantizer=quantizer, damp=damp)
        #: id of each calibrated layer -> (its name, the layer, its calibration)
        self.calibration: dict[int, tuple[str, MoE, LayerCalibration]] = {}
        #: per compressed layer (by module name when calibrated): the widths given to its experts
        self.allocations: dict[str, list[int]] = {}
        #: the attention projections :func:`mcmoe` quantized (``attention_bits``)
        self.attention: list[str] = []

    def calibrate(self, model: nn.Module, batches: Iterable,
                  run: Callable[[nn.Module, object], object] | None = None) -> None:
        """Cache every MoE layer's calibration inputs and statistics (:func:`calibrate_layers`)."""
        for name, c in calibrate_layers(model, batches, run).items():
            moe = model.get_submodule(name) if name else model
            self.calibration[id(moe)] = (name, moe, c)

    def compress_layer(self, moe: MoE, stats: ExpertStats | None = None) -> nn.Module:
        s = self.settings
        if id(moe) not in self.calibration:
            raise ValueError("mc-moe: this layer was not calibrated; call MCMoE.calibrate(model, batches) first "
                             "(or use moekit.compress.mcmoe.mcmoe(model, batches, ...))")
        name, _, calib = self.calibration[id(moe)]
        eps = expert_errors(moe, calib.x, s["widths"], s["group"])
        cost = allocation_costs(s["allocation"], calib, eps, s["widths"], s["bits"], s["alpha"], s["beta"],
                                s["gamma"], s["seed"])
        total = round(s["bits"] * moe.num_experts)
        widths = allocate_bits(cost, s["widths"], total, protect=s["allocation"] != "uniform")
        out = copy.deepcopy(moe)
        hessians = expert_hessians(moe, calib.x) if s["quantizer"] == "gptq" else None
        out.experts = QuantizedExperts.from_experts(moe.experts, widths, s["group"], hessians, s["damp"])
        out.last_routing = None
        self.allocations[name] = widths
        return out


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def attention_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` projections of every attention (:class:`moekit.models.gpt.Attention`: ``qkv`` and
    ``proj``) of ``model``, by module name."""
    out = {f"{n}.{c}" if n else c: lin for n, a in model.named_modules() if isinstance(a, Attention)
           for c, lin in a.named_children() if isinstance(lin, nn.Linear)}
    if not out:
        raise ValueError(f"mc-moe: {type(model).__name__} has no moekit GPT attention with nn.Linear projections to "
                         "quantize; drop attention_bits (or load the model as a moekit GPT)")
    return out


@torch.no_grad()
def layer_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                   run: Callable[[nn.Module, object], object] | None = None) -> dict[str, Tensor]:
    """Per module of ``layers`` (by name), the GPTQ Hessian ``2 X^T X / n`` (float64) of its inputs on
    ``batches`` (``run(model, batch)``, default ``model(batch)``), in eval mode; a module no batch
    reached is left out."""
    acc: dict[str, tuple[Tensor, int]] = {}

    def hook(name: str, _mod: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        total, n = acc.get(name, (0, 0))
        acc[name] = (total + x.t() @ x, n + x.shape[0])

    _run_hooked(model, layers, hook, batches, run)
    return {name: 2 * total / max(n, 1) for name, (total, n) in acc.items()}


def quantize_attention(model: nn.Module, bits: int, group: int = 64, hessians: dict[str, Tensor] | None = None,
                       damp: float = 0.01) -> list[str]:
    """Replace each attention projection of ``model`` (:func:`attention_linears`) in place by a
    :class:`QuantizedLinear` at ``bits``: GPTQ where ``hessians`` (:func:`layer_hessians`) has its name,
    else round-to-nearest; returns the names replaced."""
    new = {n: QuantizedLinear.from_linear(lin, bits, group, (hessians or {}).get(n), damp)
           for n, lin in attention_linears(model).items()}
    for name, module in new.items():
        _replace(model, name, module)
    return list(new)


def mcmoe(model: nn.Module, batches: Iterable, run: Callable[[nn.Module, object], object] | None = None,
          attention_bits: int | None = None, **settings) -> MCMoE:
    """Apply PMQ to every MoE layer of ``model`` in place (settings: see :class:`MCMoE`); returns the
    method, whose ``allocations`` name each layer's expert widths.

    ``attention_bits`` (the paper: 4): also quantize every attention projection of a moekit GPT to that
    width (:func:`quantize_attention`), with the same quantizer, group and damping; the method's
    ``attention`` names them. All Hessians and calibration inputs come from the float model."""
    if isinstance(model, MoE):
        raise ValueError("mcmoe: model is itself a MoE layer, which cannot be replaced in place; pass the model that "
                         "contains it, or use MCMoE(...).calibrate(moe, batches) and .compress_layer(moe)")
    method = MCMoE(**settings)
    s = method.settings
    if attention_bits is not None:
        for lin in attention_linears(model).values():
            check_layout((lin.out_features, lin.in_features), attention_bits, s["group"])
    attention_gptq = attention_bits is not None and s["quantizer"] == "gptq"
    batches = list(batches) if attention_gptq else batches  # two passes over them
    method.calibrate(model, batches, run)
    hessians = layer_hessians(model, attention_linears(model), batches, run) if attention_gptq else None
    for name, moe, _ in list(method.calibration.values()):
        _replace(model, name, method.compress_layer(moe))
    if attention_bits is not None:
        method.attention = quantize_attention(model, attention_bits, s["group"], hessians, s["damp"])
    sync_config(model)  # a transformers model's save_pretrained now refuses the packed experts
    return method


def _pick_layers(names: list[str], layers: int | str | Sequence[int | str] | None) -> list[str]:
    """The names ``layers`` designates among the MoE layer ``names`` (each a name or an index into them)."""
    if layers is None:
        return names
    out = []
    for it in [layers] if isinstance(layers, (int, str)) else list(layers):
        if isinstance(it, str) and it in names:
            out.append(it)
        elif isinstance(it, int) and not isinstance(it, bool) and 0 <= it < len(names):
            out.append(names[it])
        else:
            raise ValueError(f"with_odp: layers: {it!r} is neither the name nor the index (0 to {len(names) - 1}) "
                             f"of one of the model's MoE layers {names}")
    return out


def with_odp(model: nn.Module, protect: float = 0.02, renormalize: bool = True,
             layers: int | str | Sequence[int | str] | None = None) -> list[str]:
    """Wrap the router of every MoE layer routed by a dropless top-2 ``TopK`` in :class:`ODP` (threshold 0
    until :func:`calibrate_odp`); returns the names of the layers wrapped.

    ``layers`` restricts ODP to those MoE layers, each given by module name or by index among the
    model's MoE layers in module order (for a GPT whose every block is MoE, the block index); each
    must have such a router. (The official code picks the 10 layers of lowest pruning loss.)"""
    moes = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
    names = []
    for name in _pick_layers(list(moes), layers):
        gate = moes[name].gate
        if isinstance(gate, TopK) and gate.k == 2 and gate.capacity_factor is None:
            moes[name].gate = ODP(gate, protect=protect, renormalize=renormalize)
            names.append(name)
        elif layers is not None:
            raise ValueError(f"with_odp: layer {name!r} is not routed by a dropless top-2 TopK router")
    if not names:
        raise ValueError("with_odp: no MoE layer with a dropless top-2 TopK router in the model")
    return names


@torch.no_grad()
def calibrate_odp(model: nn.Module, batches: Iterable, run: Callable[[nn.Module, object], object] | None = None
                  ) -> dict[str, float]:
    """Set each :class:`ODP` router's ``mu`` to the median ``w1 / w0`` of its layer on ``batches``
    (measured with nothing pruned); returns the thresholds by layer name."""
    moes = {n: m for n, m in model.named_modules() if isinstance(m, MoE) and isinstance(m.gate, ODP)}
    if not moes:
        raise ValueError("calibrate_odp: no MoE layer routed by ODP; call with_odp(model) first")
    ratios: dict[str, list[Tensor]] = {n: [] for n in moes}
    for m in moes.values():
        m.gate.mu.fill_(0.0)
    _run_hooked(model, moes, lambda n, mod, _a: ratios[n].append(top2_ratio(mod.last_routing)), batches, run)
    out = {}
    for n, m in moes.items():
        if not ratios[n]:
            raise ValueError(f"calibrate_odp: no calibration batch reached layer {n!r}")
        out[n] = float(torch.quantile(torch.cat(ratios[n]).double(), 0.5))
        m.gate.mu.fill_(out[n])
    return out


#: the file of a saved model folder that names each layer's expert widths and ODP settings
LAYOUT_FILE = "mcmoe.json"


def save_compressed(model: GPT, path: str | os.PathLike, files: dict[str, str | bytes] | None = None) -> Path:
    """:meth:`GPT.save` of a model compressed by :func:`mcmoe` (and :func:`with_odp`), plus
    ``mcmoe.json``: each quantized layer's widths and group, each ODP layer's settings, each quantized
    attention projection's width and group."""
    moes = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    layout = {"experts": {n: {"bits": m.experts.bits, "group": m.experts.group} for n, m in moes
                          if isinstance(m.experts, QuantizedExperts)},
              "odp": {n: {"protect": m.gate.protect, "renormalize": m.gate.renormalize} for n, m in moes
                      if isinstance(m.gate, ODP)},
              "attention": {n: {"bits": m.bits, "group": m.group} for n, m in model.named_modules()
                            if isinstance(m, QuantizedLinear)}}
    if not any(layout.values()):
        raise ValueError("save_compressed: the model has no quantized experts nor ODP router; save it with GPT.save")
    return model.save(path, files={**(files or {}), LAYOUT_FILE: json.dumps(layout, indent=2)})


def load_compressed(path: str | os.PathLike) -> GPT:
    """The model :func:`save_compressed` wrote to ``path`` (checksums verified first)."""
    verify_model(path)
    layout = read_json(Path(path) / LAYOUT_FILE, "not a model saved by save_compressed; load a plain one with GPT.load")
    model = GPT(read_config(path))
    for name, spec in layout.get("experts", {}).items():
        moe = model.get_submodule(name)
        ex = moe.experts
        moe.experts = QuantizedExperts(ex.num_experts, ex.d_model, ex.d_ff, spec["bits"], spec["group"], ex.activation,
                                       ex.down_proj_bias is not None)
    for name, spec in layout.get("odp", {}).items():
        moe = model.get_submodule(name)
        moe.gate = ODP(moe.gate, protect=spec["protect"], renormalize=spec["renormalize"])
    restore_attention(model, layout)
    model.load_weights(path, verified=True)
    return model


def restore_attention(model: nn.Module, layout: dict) -> None:
    """Replace each attention projection that a :func:`save_compressed` layout (``mcmoe.json``) names as
    quantized by an empty :class:`QuantizedLinear` of its width and group, to load the saved weights into."""
    for name, spec in layout.get("attention", {}).items():
        lin = model.get_submodule(name)
        _replace(model, name, QuantizedLinear(lin.in_features, lin.out_features, spec["bits"], spec["group"],
                                              lin.bias is not None))
