"""Expert-parallel dispatch: tokens travel to the rank that holds their expert and back.

The same two methods as :class:`moekit.dispatch.LocalDispatcher`, so ``MoE.forward`` does not
change. With ``W`` ranks and ``E`` experts, rank ``r`` holds experts ``[r*E/W, (r+1)*E/W)``.

``dispatch``: sort the assignments by global expert (stable) and gather their rows, which puts
them in destination-rank order; exchange the per-expert counts (one ``all_to_all_single`` of
``E`` integers); one host sync turns them into split sizes; exchange the rows with an uneven
``all_to_all_single`` inside an autograd Function whose backward is the reverse exchange; permute
the received rows from source-rank-major to local-expert-major for the experts.

``combine``: undo the permutation, send the rows back (the reverse exchange), and scatter-add them,
times their combine weights (kept on the source rank, as torchtitan does), into their tokens.

Every rank calls every collective of every layer, also with zero tokens, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.dispatch import DispatchContext, Segments, sort_by_expert, weighted_scatter
from moekit.routing import Routing

__all__ = ["AllToAllDispatcher", "all_to_all"]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the backward sends the gradient back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Differentiable uneven all-to-all of the rows of ``x``: ``in_splits[j]`` rows go to rank ``j``,
    ``out_splits[j]`` rows come from rank ``j``."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class EPContext(DispatchContext):  # token_N, weight_N: each sent row's token and weight (global-expert order)
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank
    inverse: Tensor  # received order of each expert-major row


class AllToAllDispatcher:
    """Dispatcher for experts sharded along dim 0 over the ranks of ``group``."""

    def __init__(self, num_experts: int, group=None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.world:
            raise ValueError(f"expert parallelism: {num_experts} experts do not split over {self.world} ranks; "
                             f"use a world size that divides the expert count")
        self.num_experts = num_experts
        self.local = num_experts // self.world
        self.bytes_sent = 0  # rows x width x element size this rank sends in forward (tokens out and back)
        self.bytes_off_rank = 0  # the part of it that leaves the rank (rows whose expert lives elsewhere)

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Segments, EPContext]:
        W, El = self.world, self.local
        x_ND, counts_E, token_N, weight_N = sort_by_expert(x_TD, routing)
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)  # [W * El]: rank w's rows per local expert
        send = counts_E.view(W, El).sum(1).tolist()
        recv_WE = recv_counts.view(W, El)
        recv = recv_WE.sum(1).tolist()
        x_recv = all_to_all(x_ND, recv, send, self.group)
        # received rows are source-rank-major, each rank's chunk local-expert-major: make them expert-major
        starts = (torch.cumsum(recv_WE.reshape(-1), 0) - recv_WE.reshape(-1)).view(W, El)
        chunk_start = starts.t().reshape(-1)  # (expert, rank) order
        chunk_len = recv_WE.t().reshape(-1)
        n = int(chunk_len.sum())
        within = torch.arange(n, device=x_TD.device) - torch.repeat_interleave(torch.cumsum(chunk_len, 0) - chunk_len,
                                                                              chunk_len)
        perm = torch.repeat_interleave(chunk_start, chunk_len) + within
        x_local = x_recv.index_select(0, perm)
        row = x_ND.shape[1] * x_ND.element_size()
        self.bytes_sent += 2 * x_ND.shape[0] * row
        self.bytes_off_rank += 2 * (x_ND.shape[0] - send[self.rank]) * row
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n, device=perm.device)
        ctx = EPContext(token_N, weight_N, routing.num_tokens, send, recv, inverse)
        return x_local, Segments.from_counts(recv_WE.sum(0)), ctx

    def combine(self, y_local: Tensor, ctx: EPContext) -> Tensor:
        y_recv = y_local.index_select(0, ctx.inverse)
        return weighted_scatter(all_to_all(y_recv, ctx.send, ctx.recv, self.group), ctx)
