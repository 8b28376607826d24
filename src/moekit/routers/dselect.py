"""DSelect-k (Hazimeh et al., NeurIPS 2021): a differentiable gate that converges to exactly k experts.

Follows the official implementation (google-research ``dselect_k_moe``): each of ``k`` selectors
maps ``m = ceil(log2 E)`` logits through the smooth-step function to a distribution over the
binary codes of the experts (most significant bit first); a softmax over the selectors mixes them.
Once every selector logit is outside the smooth band the gate is exactly k-sparse, and moekit
then computes only the selected experts (the official layer computes all of them).

Training-only regularisers: the selector entropy ``entropy * sum(-r log(r + 1e-6))`` (a sum over
every entry, as in the official code), and, when ``E`` is not a power of two, ``sum 1 / sum_i r_i``
(coefficient 1) that keeps selector mass off codes with no expert. The per-example form sums them
over the batch (each token has its own selectors); the static form computes them once per gate used
in the call, whatever the batch size (the official code adds them once per gate: its selector
outputs have no batch axis).

Shape legend: ``T`` tokens, ``S`` selectors (= k), ``M`` code bits, ``E`` experts, ``G`` static gates used in a call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.routers._registry import register_router
from moekit.routing import Router, Routing, fp32


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """0 below ``-gamma/2``, 1 above ``gamma/2``, the cubic ``-2t^3/gamma^3 + 3t/(2 gamma) + 1/2`` between."""
    cubic = -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


def binary_codes(num_experts: int) -> Tensor:
    """``[E, M]`` 0/1 matrix: row i is i in binary, most significant bit first."""
    m = max(1, math.ceil(math.log2(num_experts))) if num_experts > 1 else 0
    i = torch.arange(num_experts)[:, None]
    return ((i >> torch.arange(m - 1, -1, -1)) & 1).float()


def selector_outputs(z_TSM: Tensor, codes_EM: Tensor, gamma: float) -> Tensor:
    """``r[T, S, E] = prod_j (S(z_j) if code_ij else 1 - S(z_j))``."""
    if codes_EM.shape[1] == 0:  # a single expert
        return z_TSM.new_ones(*z_TSM.shape[:-1], codes_EM.shape[0])
    s = smooth_step(z_TSM, gamma).unsqueeze(-2)  # [T, S, 1, M]
    return torch.where(codes_EM.bool(), s, 1 - s).prod(dim=-1)


@register_router("dselect")
class DSelectK(Router):
    """Args:
    k: number of selectors, the most experts a converged gate uses (k <= E).
    gamma: width of the smooth-step band.
    entropy: coefficient of the selector-entropy regulariser (training only); 0 turns it off.
    per_example: gate computed from each input (True) or one static gate per task (False).
    num_tasks: static form only: number of independent gates, picked by the ``task`` context.
    """

    def __init__(self, k: int = 2, gamma: float = 1.0, entropy: float = 1e-6, per_example: bool = True,
                 num_tasks: int = 1) -> None:
        super().__init__()
        check_number("k", k, lo=1, integer=True, owner="DSelectK")
        check_number("gamma", gamma, lo=0, lo_open=True, owner="DSelectK")
        check_number("entropy", entropy, lo=0, owner="DSelectK")
        check_number("num_tasks", num_tasks, lo=1, integer=True, owner="DSelectK")
        if per_example and num_tasks != 1:
            raise ValueError("DSelectK: num_tasks is for the static form (per_example=False); "
                             "per-example gates use one router per task")
        self.k, self.gamma, self.entropy = k, float(gamma), entropy
        self.per_example, self.num_tasks = bool(per_example), num_tasks
        self.context_keys = () if per_example else ("task",)

    def extra_repr(self) -> str:
        return f"k={self.k}, gamma={self.gamma}, entropy={self.entropy}, per_example={self.per_example}"

    def check_num_experts(self, num_experts: int) -> None:
        if self.k > num_experts:
            raise ValueError(f"DSelectK: k={self.k} must be <= num_experts={num_experts}; valid k is 1..{num_experts}")

    def build(self, d_model: int, num_experts: int) -> None:
        codes = binary_codes(num_experts)
        self.register_buffer("codes", codes, persistent=False)
        m, g = codes.shape[1], self.gamma
        if self.per_example:
            self.z_proj = nn.Linear(d_model, self.k * m)
            self.w_proj = nn.Linear(d_model, self.k)
            nn.init.uniform_(self.z_proj.weight, -g / 100, g / 100)
            nn.init.uniform_(self.z_proj.bias, -g / 100, g / 100)
            nn.init.uniform_(self.w_proj.weight, -0.05, 0.05)
            nn.init.uniform_(self.w_proj.bias, -0.05, 0.05)
        else:
            self.z_logits = nn.Parameter(torch.empty(self.num_tasks, self.k, m).uniform_(-g / 100, g / 100))
            self.w_logits = nn.Parameter(torch.empty(self.num_tasks, self.k).uniform_(-0.05, 0.05))

    def _task_index(self, task, T: int, device) -> Tensor:
        t = torch.as_tensor(0 if task is None else task, device=device, dtype=torch.long)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_tasks):
            raise ValueError(f"DSelectK: task ids must lie in [0, {self.num_tasks}), got {t.unique().tolist()}")
        return t.expand(T) if t.dim() == 0 else t.reshape(T)

    def _gate(self, x_TD: Tensor, task=None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Selector outputs ``r``, the dense gate ``q[T, E]`` (fp32), and the gate row of each token.

        Per example: ``r[T, S, E]``, rows ``None``. Static: ``r[G, S, E]``, one row per gate used in
        the call (not copied per token), and ``rows[T]``: token t uses ``r[rows[t]]``.
        """
        T = x_TD.shape[0]
        m = self.codes.shape[1]
        rows = None
        if self.per_example:
            xf = x_TD.float()
            with fp32(x_TD):
                z = nn.functional.linear(xf, self.z_proj.weight.float(), self.z_proj.bias.float()).view(T, self.k, m)
                w = nn.functional.linear(xf, self.w_proj.weight.float(), self.w_proj.bias.float())
        else:
            used, rows = torch.unique(self._task_index(task, T, x_TD.device), return_inverse=True)
            z, w = self.z_logits.float()[used], self.w_logits.float()[used]
        r = selector_outputs(z, self.codes, self.gamma)  # [T or G, S, E]
        q = (torch.softmax(w, dim=-1).unsqueeze(-1) * r).sum(dim=1)  # [T or G, E]
        return r, (q if rows is None else q[rows]), rows

    def gate(self, x_TD: Tensor, task=None) -> tuple[Tensor, Tensor]:
        """Selector outputs ``r[T, S, E]`` and the dense gate ``q[T, E]`` (fp32)."""
        r, q, rows = self._gate(x_TD, task)
        return (r if rows is None else r[rows]), q

    def forward(self, x_TD: Tensor, task=None, **context) -> Routing:
        self._require_bound()
        T, E = x_TD.shape[0], self.num_experts
        r, q, _ = self._gate(x_TD, task)  # static form: r holds each gate once, so the losses ignore T
        token, expert = torch.nonzero(q, as_tuple=True)  # exact zeros are dropped: only used experts run
        routing = Routing(token=token, expert=expert, weight=q[token, expert], num_tokens=T, num_experts=E,
                          requested=T * E)
        if self.training and T:
            if self.entropy:
                routing.losses["entropy"] = self.entropy * -(r * torch.log(r + 1e-6)).sum()
            if E & (E - 1):  # not a power of two
                routing.losses["unreachable"] = (1.0 / r.sum(dim=-1)).sum()
        return routing

    def nonzero_experts(self, x_TD: Tensor | None = None, task=None, threshold: float = 0.0) -> Tensor:
        """Number of experts with gate weight above ``threshold``: ``[T]`` (per example) or ``[tasks]`` (static)."""
        with torch.no_grad():
            if self.per_example:
                return (self.gate(x_TD)[1] > threshold).sum(-1)
            return (self.gate(torch.zeros(self.num_tasks, self.d_model), torch.arange(self.num_tasks))[1]
                    > threshold).sum(-1)
