"""What calibration data does in each MoE layer: the per-expert statistics compression methods
decide from."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.layer import MoE

__all__ = ["ExpertStats", "gather_stats"]


@dataclass
class ExpertStats:
    """What the calibration data did in one MoE layer: ``tokens[E]`` assignments routed to each
    expert (non-zero weight), ``gate[E]`` the sum of their combine weights, ``num_tokens`` tokens seen."""

    tokens: Tensor
    gate: Tensor
    num_tokens: int = 0

    @classmethod
    def empty(cls, num_experts: int) -> ExpertStats:
        return cls(torch.zeros(num_experts, dtype=torch.long), torch.zeros(num_experts, dtype=torch.float64))

    def add(self, moe: MoE) -> None:
        """Count the routing of ``moe``'s last forward."""
        r = moe.last_routing
        used = r.weight.detach() != 0
        E = self.tokens.numel()
        self.tokens += torch.bincount(r.expert[used].cpu(), minlength=E)
        self.gate += torch.zeros(E, dtype=torch.float64).index_add_(0, r.expert[used].cpu(),
                                                                    r.weight.detach()[used].double().cpu())
        self.num_tokens += r.num_tokens


@torch.no_grad()
def gather_stats(model: nn.Module, batches: Iterable, run: Callable[[nn.Module, object], object] | None = None
                 ) -> dict[str, ExpertStats]:
    """Per MoE layer (by module name), the routing statistics of ``batches`` run through ``model``
    (``run(model, batch)``; default ``model(batch)``), in eval mode."""
    moes = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
    stats = {n: ExpertStats.empty(m.num_experts) for n, m in moes.items()}
    hooks = [m.register_forward_hook(lambda mod, _a, _o, n=n: stats[n].add(mod)) for n, m in moes.items()]
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
