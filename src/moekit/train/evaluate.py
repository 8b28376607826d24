"""Validation: perplexity overall and per label (language, topic...), and expert load per label."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moekit.data.dataset import TokenStream
from moekit.layer import MoE


@dataclass
class EvalResult:
    loss: float
    ppl: float
    tokens: int
    per_label: dict[str, dict[str, float]] = field(default_factory=dict)  # field -> label -> ppl
    #: field -> MoE layer name -> {"labels": [...], "counts": [[per expert] per label]}
    expert_load: dict[str, dict[str, dict]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens, "per_label": self.per_label,
                "expert_load": self.expert_load}


@torch.no_grad()
def evaluate(model, stream: TokenStream, seq_len: int, batch_size: int = 16, max_chunks: int | None = None,
             label_fields: tuple[str, ...] = ()) -> EvalResult:
    """Mean next-token NLL over consecutive windows of ``stream`` (eval mode, restored afterwards),
    computed on the model's device; the statistics are gathered on the CPU."""
    stream.check_fits(seq_len, "validation data")
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    x_all, y_all, d_all = stream.chunks(seq_len, max_chunks)
    labels = {f: stream.labels(f) for f in label_fields}
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    nll_sum = {f: torch.zeros(len(labels[f][0]), dtype=torch.float64) for f in label_fields}
    tok_count = {f: torch.zeros(len(labels[f][0]), dtype=torch.float64) for f in label_fields}
    load = {f: {n: torch.zeros(len(labels[f][0]), m.num_experts, dtype=torch.long) for n, m in moes.items()}
            for f in label_fields}
    total_nll, total_tokens = 0.0, 0
    for i in range(0, x_all.shape[0], batch_size):
        x, y, d = x_all[i : i + batch_size], y_all[i : i + batch_size], d_all[i : i + batch_size]
        logits = model(x.to(device))
        nll = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).reshape(-1), reduction="none").double().cpu()
        total_nll += float(nll.sum())
        total_tokens += nll.numel()
        for f in label_fields:
            lab = labels[f][1][d.reshape(-1).long()]  # label of each target token
            nll_sum[f].index_add_(0, lab, nll)
            tok_count[f].index_add_(0, lab, torch.ones_like(nll))
            # a position's routing is decided on its input token, which belongs to the same window
            for name, m in moes.items():
                r = m.last_routing
                if r is None:
                    continue
                n_lab, E = load[f][name].shape
                flat = lab[r.token.cpu()] * E + r.expert.cpu()
                load[f][name] += torch.bincount(flat, minlength=n_lab * E).view(n_lab, E)
    model.train(was_training)
    loss = total_nll / max(total_tokens, 1)
    res = EvalResult(loss=loss, ppl=math.exp(loss), tokens=total_tokens)
    for f in label_fields:
        names = labels[f][0]
        res.per_label[f] = {n: math.exp(float(nll_sum[f][j] / tok_count[f][j])) for j, n in enumerate(names)
                            if tok_count[f][j] > 0}
        res.expert_load[f] = {name: {"labels": names, "counts": c.tolist()} for name, c in load[f].items()}
    return res
