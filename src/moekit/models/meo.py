"""MEO, Merging Experts into One (He et al., EMNLP 2023): a sequence-level gate picks ``k`` experts
and the sequence runs *one* FFN whose weights are the gate-weighted sum of theirs.

Per sequence ``b`` a noisy top-k gate (Shazeer et al. 2017) on a gate input ``s_b`` selects experts
``i`` with weights ``g_{b,i}`` (softmax over the ``k`` selected logits); every projection is merged
once, ``W~_b = sum_i g_{b,i} W_i`` and ``b~_b = sum_i g_{b,i} b_i``, and the sequence's tokens go
through the FFN with the merged weights: one GEMM per projection instead of ``k`` (paper Eq. 3-4).
For a linear expert this equals ``sum_i g_i W_i x`` exactly; for a SwiGLU expert it does not (the
activation sits between the merged projections), so an MEO model is trained as such and
``merge=False`` gives the same gate's vanilla mixture ``sum_i g_{b,i} E_i(x)`` at ``k`` times the FFN
compute, the comparison the paper makes.

Gate inputs (``gate_on``):

- ``"task"``: a learned embedding of the sequence's task id (context key ``task_ids``, ``[B]``). It
  is known before the first token, so a causal LM stays causal: task-level MEO.
- ``"mean"``: the mean hidden state of the sequence, the paper's default in BERT. Every position's
  output then depends on every token of its sequence, later ones included; a causal LM must not
  use it (a GPT refuses it), an encoder may.

``token_attention`` adds the paper's token-level step first, ``x <- x + W_up relu(W_down x)`` with a
``D -> max(1, D // 64) -> D`` bottleneck whose up-projection starts at zero (code ``layers.py``).

The auxiliary loss is Shazeer's ``coef * (cv^2(importance) + cv^2(load))`` over the batch's
sequences (code default ``coef = 0.01``): importance is each expert's summed gate weight, load its
smooth probability of being selected under the gate noise (training with noise) or its selection
count (otherwise). ``last_routing`` records the gate as a :class:`~moekit.routing.Routing` whose
"tokens" are the ``B`` sequences, so ``aux_loss`` and ``routing_stats`` read it like any MoE layer's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit._checks import check_number
from moekit.experts import GroupedExperts
from moekit.models.config import GPTConfig
from moekit.models.ffn import register_ffn
from moekit.routing import Routing

__all__ = ["MEO", "noisy_top_k", "cv_squared"]

GATE_INPUTS = ("task", "mean")
NOISE_FLOOR = 1e-2  # Shazeer's noise_epsilon


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation ``var(x) / (mean(x)^2 + 1e-10)`` (unbiased variance, as in
    Shazeer's code); ``0`` for a single value."""
    if x.numel() <= 1:
        return torch.zeros((), device=x.device, dtype=x.dtype)
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def noisy_top_k(clean: Tensor, noise_std: Tensor | None, k: int, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Shazeer's noisy top-k gate on ``[B, E]`` logits: ``(indices [B, k], weights [B, k], load [E])``.

    With ``noise_std`` (``[B, E]``, positive) the logits get ``N(0, noise_std^2)`` noise and the load
    is the smooth ``sum_b P(expert i in top k)``, with ``P = Phi((clean - threshold) / noise_std)``
    where the threshold is the ``(k+1)``-th noisy logit if ``i`` is in the top ``k``, else the
    ``k``-th; without noise (or ``k = E``) the load is the selection count."""
    E = clean.shape[-1]
    logits = clean if noise_std is None else clean + torch.randn(clean.shape, generator=generator,
                                                                 device=clean.device, dtype=clean.dtype) * noise_std
    top, idx = logits.topk(min(k + 1, E), dim=-1)
    weights = torch.softmax(top[:, :k], dim=-1)
    if noise_std is None or k >= E:
        load = torch.zeros(E, device=clean.device, dtype=clean.dtype).index_add_(
            0, idx[:, :k].reshape(-1), torch.ones(idx[:, :k].numel(), device=clean.device, dtype=clean.dtype))
        return idx[:, :k], weights, load
    normal = torch.distributions.Normal(torch.zeros((), device=clean.device), torch.ones((), device=clean.device))
    threshold_in, threshold_out = top[:, k:k + 1], top[:, k - 1:k]
    is_in = logits > threshold_in
    p_in = normal.cdf((clean - threshold_in) / noise_std)
    p_out = normal.cdf((clean - threshold_out) / noise_std)
    return idx[:, :k], weights, torch.where(is_in, p_in, p_out).sum(0)


class MEO(nn.Module):
    """Args:
    d_model, d_ff, num_experts, activation, bias: the experts (a :class:`GroupedExperts`).
    k: experts merged per sequence.
    gate_on: ``"task"`` (needs ``num_tasks`` and ``task_ids`` at call) or ``"mean"`` (non-causal).
    num_tasks: number of task ids for ``gate_on="task"``.
    noisy: add the gate's learned noise in training (Shazeer); evaluation is always noise-free.
    balance: coefficient of ``cv^2(importance) + cv^2(load)``.
    merge: ``True`` merges the weights (MEO); ``False`` sums the ``k`` experts' outputs (vanilla).
    token_attention: the token-level bottleneck step before the gate.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 8, k: int = 2, gate_on: str = "task",
                 num_tasks: int | None = None, noisy: bool = True, balance: float = 0.01, merge: bool = True,
                 token_attention: bool = False, activation: str = "swiglu", bias: bool = False,
                 copies: bool = True) -> None:
        super().__init__()
        check_number("num_experts", num_experts, lo=1, integer=True, owner="MEO")
        check_number("k", k, lo=1, hi=num_experts, integer=True, owner="MEO")
        check_number("balance", balance, lo=0, owner="MEO")
        if gate_on not in GATE_INPUTS:
            raise ValueError(f"MEO: gate_on must be one of {GATE_INPUTS}, got {gate_on!r}")
        if gate_on == "task":
            check_number("num_tasks", num_tasks, lo=1, integer=True, owner="MEO (gate_on='task')")
            self.task_embedding = nn.Embedding(num_tasks, d_model)
        self.num_experts, self.k, self.gate_on, self.num_tasks = num_experts, k, gate_on, num_tasks
        self.noisy, self.balance, self.merge, self.copies = bool(noisy), float(balance), bool(merge), bool(copies)
        self.experts = GroupedExperts(num_experts, d_model, d_ff, activation, bias=bias)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.noise = nn.Linear(d_model, num_experts, bias=False) if noisy else None
        self.token_attention = None
        if token_attention:
            r = max(1, d_model // 64)
            self.token_attention = nn.Sequential(nn.Linear(d_model, r), nn.ReLU(), nn.Linear(r, d_model))
            nn.init.zeros_(self.token_attention[2].weight)
            nn.init.zeros_(self.token_attention[2].bias)
        self.context_keys = ("task_ids",) if gate_on == "task" else ()
        self.last_routing: Routing | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts N(0, 0.02) (copies of the first with ``copies``); the gate and noise projections
        start at zero (Shazeer); the task embedding N(0, 1), the scale of the normalised hidden states
        the paper's mean-gate reads (at 0.02 the gate barely learns and its noise decides)."""
        for p in self.experts.parameters():
            nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.zeros_(p)
        self.copy_first_expert()
        if self.gate_on == "task":  # the scale of the RMS-normed hidden states a mean-gate reads
            nn.init.normal_(self.task_embedding.weight, std=1.0)
        nn.init.zeros_(self.gate.weight)
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)

    @torch.no_grad()
    def copy_first_expert(self) -> None:
        """With ``copies``, every expert's tensors become the first expert's (a model re-initialising
        the experts its own way calls this after)."""
        if self.copies:
            for p in self.experts.parameters():
                p.copy_(p[:1].expand_as(p))

    def extra_repr(self) -> str:
        return (f"k={self.k}, gate_on={self.gate_on!r}, num_tasks={self.num_tasks}, noisy={self.noisy}, "
                f"balance={self.balance}, merge={self.merge}")

    def own_init_parameters(self) -> list[nn.Parameter]:
        """The parameters a model must leave at this layer's initialisation (the zero gate, the
        unit-scale task embedding)."""
        own = [self.gate.weight] + ([] if self.noise is None else [self.noise.weight])
        return own + ([self.task_embedding.weight] if self.gate_on == "task" else [])

    def expert_params(self) -> int:
        return sum(p.numel() for p in self.experts.parameters())

    def gate_input(self, x_BTD: Tensor, task_ids: Tensor | None) -> Tensor:
        if self.gate_on == "mean":
            return x_BTD.mean(dim=1)
        if task_ids is None:
            raise ValueError("MEO gates on the task: pass task_ids, one id per sequence ([B] int64)")
        task_ids = torch.as_tensor(task_ids, device=x_BTD.device).reshape(-1)
        if task_ids.numel() != x_BTD.shape[0]:
            raise ValueError(f"MEO: {task_ids.numel()} task_ids for a batch of {x_BTD.shape[0]} sequences")
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
            raise ValueError(f"MEO: task_ids must lie in [0, {self.num_tasks}), got "
                             f"[{int(task_ids.min())}, {int(task_ids.max())}]")
        return self.task_embedding(task_ids.long())

    def route(self, s_BD: Tensor) -> tuple[Tensor, Tensor]:
        """Gate the sequences: ``(indices [B, k], weights [B, k])``; records ``last_routing``."""
        dtype = torch.promote_types(s_BD.dtype, torch.float32)  # the gate in fp32 at least
        clean = self.gate(s_BD).to(dtype)
        noise_std = None
        if self.training and self.noise is not None:
            noise_std = F.softplus(self.noise(s_BD).to(dtype)) + NOISE_FLOOR
        idx, w, load = noisy_top_k(clean, noise_std, self.k)
        B = s_BD.shape[0]
        importance = torch.zeros(self.num_experts, device=w.device, dtype=w.dtype).index_add(
            0, idx.reshape(-1), w.reshape(-1))
        loss = self.balance * (cv_squared(importance) + cv_squared(load))
        self.last_routing = Routing(
            token=torch.arange(B, device=idx.device).repeat_interleave(self.k), expert=idx.reshape(-1),
            weight=w.reshape(-1), num_tokens=B, num_experts=self.num_experts,
            losses={"balance": loss} if self.balance else {}, logits=clean, requested=B * self.k)
        return idx, w

    def _ffn(self, x_BTD: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
        """The FFN of per-sequence weights ``w1 [B, out, D]``, ``w2 [B, D, F]`` (biases ``[B, out]``)."""
        h = torch.bmm(x_BTD, w1.transpose(1, 2))
        if b1 is not None:
            h = h + b1[:, None]
        y = torch.bmm(self.experts.act.apply(h), w2.transpose(1, 2))
        return y if b2 is None else y + b2[:, None]

    def forward(self, x_BTD: Tensor, task_ids: Tensor | None = None) -> Tensor:
        if self.token_attention is not None:
            x_BTD = x_BTD + self.token_attention(x_BTD)
        idx, w = self.route(self.gate_input(x_BTD, task_ids))
        w = w.to(x_BTD.dtype)
        ex = self.experts
        w1, w2 = ex.first_proj, ex.down_proj
        b1 = getattr(ex, ex._first + "_bias", None)
        b2 = ex.down_proj_bias
        if self.merge:
            def mix(p: Tensor | None) -> Tensor | None:
                return None if p is None else torch.einsum("bk,bk...->b...", w, p[idx])

            return self._ffn(x_BTD, mix(w1), mix(b1), mix(w2), mix(b2))
        y = 0
        for j in range(self.k):
            e = idx[:, j]
            out = self._ffn(x_BTD, w1[e], None if b1 is None else b1[e], w2[e], None if b2 is None else b2[e])
            y = y + w[:, j, None, None] * out
        return y


@register_ffn("meo")
def meo(cfg: GPTConfig, spec: dict) -> nn.Module:
    """MEO in a causal GPT: task-level gating only (the sequence mean would let a position see later tokens)."""
    if spec.get("gate_on", "task") != "task":
        raise ValueError(f"GPTConfig.ffn: an 'meo' layer of a causal GPT must gate on the task, got gate_on="
                         f"{spec['gate_on']!r} (the sequence mean lets each position see the tokens after it)")
    return MEO(cfg.d_model, spec.get("d_ff", cfg.d_ff), spec.get("num_experts", 8), spec.get("k", 2), "task",
               spec.get("num_tasks"), spec.get("noisy", True), spec.get("balance", 0.01), spec.get("merge", True),
               spec.get("token_attention", False), spec.get("activation", "swiglu"), copies=spec.get("copies", True))
