"""What calibration data does in each MoE layer: the per-expert statistics compression methods
decide from.

Per layer and expert ``e``: the hard top-k counts ``n_e`` (``tokens``), the gate mass ``w_e``
(``gate``), the soft mass ``s_e`` (``soft``: the full softmax of the router's logits summed over all
tokens), the mean output ``o_e`` of the expert over *all* tokens, each token fed to every expert
(``mean_output``, HC-SMoE's feature), REAP's saliency (``reap``), EASY-EP's score (``easyep``) and
the second/first combine-weight ratios ``w1/w0`` of the tokens with two experts or more (``ratios``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.experts import GroupedExperts
from moekit.layer import MoE
from moekit.routing import Routing

__all__ = ["ExpertStats", "expert_outputs", "gather_stats"]


def expert_outputs(experts: GroupedExperts, x_TD: Tensor) -> Tensor:
    """``[E, T, D]``: every expert applied to every token (routing-independent)."""
    h = torch.einsum("td,eod->eto", x_TD, experts.first_proj)
    if experts.first_bias is not None:
        h = h + experts.first_bias[:, None, :]
    y = torch.einsum("etf,edf->etd", experts.act.apply(h), experts.down_proj)
    if experts.down_proj_bias is not None:
        y = y + experts.down_proj_bias[:, None, :]
    return y


def _router_logits(moe: MoE, r: Routing, x_TD: Tensor) -> Tensor | None:
    """The router's ``[T, E]`` logits over this layer's experts, if it has such logits."""
    logits = r.logits
    if logits is None and callable(getattr(moe.gate, "logits", None)):
        logits = moe.gate.logits(x_TD)
    if logits is None or logits.shape != (x_TD.shape[0], moe.num_experts):
        return None
    return logits.detach().double()


def _f64(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.float64)


@dataclass
class ExpertStats:
    """What the calibration data did in one MoE layer (see the module docstring). ``tokens[E]``
    assignments routed to each expert (non-zero weight), ``gate[E]`` the sum of their combine
    weights, ``num_tokens`` tokens seen; ``soft`` is NaN when the router has no logits over the
    layer's experts; ``k`` is the router's experts per token. ``inputs`` holds the first ``keep_inputs`` input rows (for output-matching methods)."""

    tokens: Tensor
    gate: Tensor
    num_tokens: int = 0
    soft: Tensor | None = None
    output_sum: Tensor | None = None
    reap_sum: Tensor | None = None
    easyep: Tensor | None = None
    ratio_parts: list[Tensor] = field(default_factory=list)
    input_parts: list[Tensor] = field(default_factory=list)
    keep_inputs: int = 0
    layer: str = ""
    k: int = 1

    @classmethod
    def empty(cls, num_experts: int, keep_inputs: int = 0, layer: str = "", k: int = 1) -> ExpertStats:
        E = num_experts
        return cls(torch.zeros(E, dtype=torch.long), _f64(E), soft=_f64(E), reap_sum=_f64(E), easyep=_f64(E),
                   keep_inputs=keep_inputs, layer=layer, k=k)

    @property
    def mean_output(self) -> Tensor:
        """``[E, D]``: each expert's mean output over all calibration tokens."""
        if self.output_sum is None:
            why = ("its experts are not in-memory GroupedExperts (offloaded or quantized?)" if self.num_tokens
                   else "no calibration token seen; pass non-empty batches")
            raise ValueError(f"ExpertStats {self.layer!r}: no mean expert outputs: {why}")
        return self.output_sum / max(self.num_tokens, 1)

    @property
    def reap(self) -> Tensor:
        """``[E]``: REAP saliency, the mean over the tokens routed to ``e`` of ``g_e(x)·‖f_e(x)‖₂``
        (``g`` renormalised over the token's experts); 0 for an expert no token was routed to."""
        return self.reap_sum / self.tokens.clamp_min(1)

    @property
    def ratios(self) -> Tensor:
        """``w1/w0`` (second over first combine weight) of every token routed to two experts or more."""
        return torch.cat(self.ratio_parts) if self.ratio_parts else _f64(0)

    @property
    def inputs(self) -> Tensor:
        if not self.input_parts:
            raise ValueError(f"ExpertStats {self.layer!r}: no inputs kept; gather with keep_inputs > 0")
        return torch.cat(self.input_parts)

    def add(self, moe: MoE, x: Tensor) -> None:
        """Count the routing of ``moe``'s last forward on the input ``x``."""
        r = moe.last_routing
        x_TD = x.detach().reshape(-1, moe.d_model)
        used = r.weight.detach() != 0
        t, e, w = r.token[used].cpu(), r.expert[used].cpu(), r.weight.detach()[used].double().cpu()
        E, T = self.tokens.numel(), x_TD.shape[0]
        self.tokens += torch.bincount(e, minlength=E)
        self.gate += _f64(E).index_add_(0, e, w)
        self.num_tokens += r.num_tokens
        logits = _router_logits(moe, r, x_TD)
        self.soft += torch.softmax(logits, -1).sum(0).cpu() if logits is not None else torch.nan
        self._add_outputs(moe, x_TD, t, e, w)
        dense = torch.zeros(T, E, dtype=torch.float64).index_put_((t, e), w, accumulate=True)
        if E >= 2:
            top = dense.topk(2, dim=-1).values
            two = top[:, 1] > 0
            self.ratio_parts.append(top[two, 1] / top[two, 0])
        room = self.keep_inputs - sum(p.shape[0] for p in self.input_parts)
        if room > 0:
            self.input_parts.append(x_TD[:room].clone())


    def _add_outputs(self, moe: MoE, x_TD: Tensor, t: Tensor, e: Tensor, w: Tensor) -> None:
        """The statistics that run every expert on every token: mean outputs, REAP, EASY-EP (NaN, and
        no mean outputs, when the experts are not in-memory :class:`GroupedExperts`)."""
        experts = moe.experts
        if not isinstance(experts, GroupedExperts) or experts.down_proj.is_meta:
            self.reap_sum += torch.nan
            self.easyep += torch.nan
            return
        E, T = self.tokens.numel(), x_TD.shape[0]
        outs = expert_outputs(experts, x_TD).double().cpu()  # [E, T, D]
        self.output_sum = outs.sum(1) + (0 if self.output_sum is None else self.output_sum)
        norms = outs[e, t].norm(dim=-1)  # ‖f_e(x_t)‖ of each assignment
        g = w / _f64(T).index_add_(0, t, w)[t]
        self.reap_sum += _f64(E).index_add_(0, e, g * norms)
        h = x_TD.double().cpu()
        routed = torch.zeros_like(h).index_add_(0, t, w[:, None] * outs[e, t])
        change = (1 - torch.cosine_similarity(h, h + routed, dim=-1)).clamp_min(0)
        self.easyep += _f64(E).index_add_(0, e, w * norms * change[t])


@torch.no_grad()
def gather_stats(model: nn.Module, batches: Iterable, run: Callable[[nn.Module, object], object] | None = None,
                 keep_inputs: int = 0) -> dict[str, ExpertStats]:
    """Per MoE layer (by module name), the statistics of ``batches`` run through ``model``
    (``run(model, batch)``; default ``model(batch)``), in eval mode; each layer keeps its first
    ``keep_inputs`` input rows."""
    moes = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
    stats = {n: ExpertStats.empty(m.num_experts, keep_inputs, n, getattr(m.gate, "k", 1)) for n, m in moes.items()}
    hooks = [m.register_forward_hook(lambda mod, args, _o, n=n: stats[n].add(mod, args[0])) for n, m in moes.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            (run or (lambda m, b: m(b)))(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats
