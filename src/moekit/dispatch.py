"""Local (single-device) dispatch: sort assignments by expert, gather once, combine.

The dispatcher owns data movement only; the expert math lives in :mod:`moekit.experts`. An
expert-parallel dispatcher (``moekit.parallel``) exposes the same two methods, so swapping the
communication never touches the experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.routing import Routing, count_per_expert


@dataclass
class Segments:
    """Rows of an expert-sorted batch: expert ``e`` owns rows ``[ends[e] - counts[e], ends[e])``.

    The sizes stay on the device until a backend asks for :attr:`sizes` (one host read, cached):
    backends that take ``ends`` as a tensor (``grouped_mm``) never wait for the device, and under
    ``torch.compile`` never split the graph.
    """

    counts: Tensor  # [E] int64
    ends: Tensor  # [E] int32 inclusive cumulative sums (``offs`` of torch._grouped_mm)
    _sizes: list[int] | None = field(default=None, repr=False)

    @classmethod
    def from_counts(cls, counts_E: Tensor) -> Segments:
        return cls(counts_E, torch.cumsum(counts_E, 0).to(torch.int32))

    @property
    def sizes(self) -> list[int]:
        """The counts on the host (read once, on first use)."""
        if self._sizes is None:
            self._sizes = self.counts.tolist()
        return self._sizes

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    def expert_of_row(self, num_rows: int | None = None) -> Tensor:
        """``[N]`` expert id of each sorted row; pass ``num_rows`` (``N``) to skip a host read."""
        experts = torch.arange(self.counts.shape[0], device=self.counts.device)
        n = self.num_rows if num_rows is None else num_rows
        return torch.repeat_interleave(experts, self.counts, output_size=n)


@dataclass
class DispatchContext:
    token_N: Tensor  # token of each sorted row
    weight_N: Tensor  # combine weight of each sorted row
    num_tokens: int


def sort_by_expert(x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_ND, counts_E, token_N, weight_N)``: the assignments sorted by expert (stable, so ties
    keep token order) and their rows gathered once."""
    expert_sorted, order = torch.sort(routing.expert, stable=True)
    counts_E = count_per_expert(expert_sorted, routing.num_experts)
    token_N = routing.token.index_select(0, order)
    weight_N = routing.weight.index_select(0, order)
    return x_TD.gather(0, _rows(token_N, x_TD.shape[-1])), counts_E, token_N, weight_N


def _rows(index_N: Tensor, width: int) -> Tensor:
    """``index_N`` expanded over ``width`` columns (no copy), for row-wise gather/scatter_add.

    The same kernels as ``index_select``/``index_add_`` eagerly; under torch.compile, the scatter-add
    (the combine, and the gather's backward) runs as the aten kernel instead of per-element atomic adds.
    """
    return index_N.unsqueeze(-1).expand(-1, width)


def weighted_scatter(y_ND: Tensor, ctx: DispatchContext) -> Tensor:
    """Each sorted row times its combine weight, summed into its token: ``[num_tokens, D]``."""
    w_N1 = ctx.weight_N.to(y_ND.dtype).unsqueeze(-1)
    # the experts' output buffer is ours alone: scale it in place unless autograd needs it
    y_ND = y_ND * w_N1 if (y_ND.requires_grad or w_N1.requires_grad) else y_ND.mul_(w_N1)
    out_TD = y_ND.new_zeros(ctx.num_tokens, y_ND.shape[-1])
    return out_TD.scatter_add_(0, _rows(ctx.token_N, y_ND.shape[-1]), y_ND)


class LocalDispatcher:
    """Sort by expert (stable, so ties keep token order), gather, and weighted scatter-add back."""

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Segments, DispatchContext]:
        x_ND, counts_E, token_N, weight_N = sort_by_expert(x_TD, routing)
        return x_ND, Segments.from_counts(counts_E), DispatchContext(token_N, weight_N, routing.num_tokens)

    def combine(self, y_ND: Tensor, ctx: DispatchContext) -> Tensor:
        return weighted_scatter(y_ND, ctx)
