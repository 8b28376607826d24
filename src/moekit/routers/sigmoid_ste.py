"""DSMoE (Lv et al., arXiv 2502.12455): independent sigmoid gates, a hard threshold, a straight-through
estimator, the ``n / #active`` rescale and an L1 sparsity loss; a variable number of experts per token.

Exactly as the paper (§4.2): ``q_i = sigmoid(x Y_i)``, ``G(q) = q * [q > tau]``; training uses the
STE ``S(q) = sg(G(q)) + q - sg(q)`` (forward value G, gradient of the identity), so a gate below
``tau`` still learns while its expert's weights get no gradient; the output is rescaled by
``n / #active``. Our choices, where the paper is silent: the denominator is clamped to 1 (a token
with no active gate gets a zero FFN output instead of a division by zero), the gate has no bias,
and the sparsity loss uses ``G`` (its gradient reaches active gates only; ``sparsity_grad="S"``
sends it to every gate). The paper averages the loss over layers and experts with coefficient 1:
the per-layer value here is ``sparsity * mean(G)``, so ``sparsity = 1 / n_layers`` reproduces it.

Training computes every expert for every token (the gate gradient needs each expert's output);
inference computes only the active ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit._checks import check_number
from moekit.routers._registry import register_router
from moekit.routing import LinearRouter, Routing


@register_router("sigmoid_ste")
class SigmoidSTE(LinearRouter):
    """Args:
    tau: threshold in (0, 1).
    sparsity: coefficient of the L1 loss on thresholded gates (``losses["sparsity"]``).
    rescale: multiply by ``n / #active`` (eq. 8).
    ste: straight-through gradient (``False`` is the paper's no-STE ablation: train with G).
    sparsity_grad: ``"G"`` (default) or ``"S"``: which form the sparsity loss differentiates.
    """

    def __init__(self, tau: float = 0.5, sparsity: float = 1.0, rescale: bool = True, ste: bool = True,
                 sparsity_grad: str = "G") -> None:
        super().__init__()
        check_number("tau", tau, lo=0, hi=1, lo_open=True, owner="SigmoidSTE")
        if tau >= 1:
            raise ValueError(f"SigmoidSTE: tau must lie in (0, 1), got {tau!r}")
        check_number("sparsity", sparsity, lo=0, owner="SigmoidSTE")
        if sparsity_grad not in ("G", "S"):
            raise ValueError(f"SigmoidSTE: sparsity_grad must be 'G' or 'S', got {sparsity_grad!r}")
        self.tau, self.sparsity, self.rescale, self.ste = float(tau), sparsity, bool(rescale), bool(ste)
        self.sparsity_grad = sparsity_grad

    def extra_repr(self) -> str:
        return f"tau={self.tau}, sparsity={self.sparsity}, rescale={self.rescale}, ste={self.ste}"

    def forward(self, x_TD: Tensor, **context) -> Routing:
        self._require_bound()
        T, E = x_TD.shape[0], self.num_experts
        logits = self.logits(x_TD)
        q = torch.sigmoid(logits)
        active = q > self.tau
        hard = q * active  # G(q)
        gate = hard.detach() + q - q.detach() if self.ste else hard  # S(q): value G, gradient 1
        if self.rescale:
            gate = gate * (E / active.sum(-1, keepdim=True).clamp_min(1)).to(gate.dtype)
        if self.training:
            # every pair: inactive experts contribute 0 to the output but the gate still learns (STE)
            token = torch.arange(T, device=x_TD.device).repeat_interleave(E)
            expert = torch.arange(E, device=x_TD.device).repeat(T)
            weight = gate.reshape(-1)
            if not self.ste:  # no gradient can reach an inactive gate: skip its expert
                keep = active.reshape(-1)
                token, expert, weight = token[keep], expert[keep], weight[keep]
        else:
            token, expert = torch.nonzero(active, as_tuple=True)
            weight = gate[token, expert]
        routing = Routing(token=token, expert=expert, weight=weight, num_tokens=T, num_experts=E, logits=logits,
                          requested=T * E)
        if self.training and self.sparsity and T:
            penalty = hard if self.sparsity_grad == "G" else (hard.detach() + q - q.detach())
            routing.losses["sparsity"] = self.sparsity * penalty.mean()
        return routing
