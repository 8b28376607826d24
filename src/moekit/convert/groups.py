"""Which hidden channels of a dense FFN go together into one expert.

``FFN(x) = sum_i (act(x W_i) * x U_i) V_i`` over any partition of the hidden channels into sets
``i`` (papers.md §4.2). The sets are contiguous blocks (DSMoE) or balanced clusters of channels by
any per-channel features (MoEfication's parameter clustering, or co-activation on calibration text).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["valid_expert_counts", "check_divides", "contiguous_groups", "cluster_groups"]


def valid_expert_counts(d_ff: int, limit: int = 64) -> list[int]:
    return [e for e in range(1, min(d_ff, limit) + 1) if d_ff % e == 0]


def check_divides(d_ff: int, num_experts: int, who: str) -> None:
    """Raise unless ``num_experts`` is a positive integer dividing ``d_ff`` (the message lists valid counts)."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1 or d_ff % num_experts:
        raise ValueError(f"{who}: num_experts={num_experts} does not divide d_ff={d_ff}; "
                         f"valid counts: {valid_expert_counts(d_ff)}")


def contiguous_groups(d_ff: int, num_experts: int) -> Tensor:
    """``[E, d_ff / E]``: expert ``e`` holds channels ``e*f .. (e+1)*f - 1`` (DSMoE)."""
    check_divides(d_ff, num_experts, "contiguous_groups")
    return torch.arange(d_ff).view(num_experts, -1)


def _assign(sim: Tensor, size: int) -> Tensor:
    """Each row of ``sim [F, E]`` to a column, most confident pairs first, at most ``size`` rows per column."""
    F, num_experts = sim.shape
    order = torch.argsort(sim.reshape(-1), descending=True).tolist()
    new, room, left = [-1] * F, [size] * num_experts, F
    for flat in order:  # plain Python lists: this loop visits up to F * E pairs
        ch, e = divmod(flat, num_experts)
        if new[ch] < 0 and room[e] > 0:
            new[ch] = e
            room[e] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(new)


def cluster_groups(features: Tensor, num_experts: int, iters: int = 25, seed: int = 0) -> Tensor:
    """Balanced k-means of the rows of ``features [F, k]`` into ``num_experts`` equal clusters
    (cosine similarity; each step assigns channels greedily, most confident first, to the nearest
    centroid that still has room). Returns ``[E, F / E]`` channel ids, sorted within each expert."""
    F = features.shape[0]
    check_divides(F, num_experts, "cluster_groups")
    x = nn.functional.normalize(features.detach().double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    # k-means++ seeding
    centroids = [x[torch.randint(F, (1,), generator=g)].squeeze(0)]
    for _ in range(1, num_experts):
        d = (1 - x @ torch.stack(centroids).T).clamp_min(0).min(dim=1).values
        centroids.append(x[torch.multinomial(d + 1e-12, 1, generator=g)].squeeze(0))
    c = torch.stack(centroids)
    assign = torch.full((F,), -1, dtype=torch.long)
    for _ in range(iters):
        new_t = _assign(x @ c.T, F // num_experts)
        if torch.equal(new_t, assign):
            break
        assign = new_t
        c = torch.stack([nn.functional.normalize(x[assign == e].mean(0), dim=0) for e in range(num_experts)])
    return torch.stack([torch.nonzero(assign == e).squeeze(1) for e in range(num_experts)])
