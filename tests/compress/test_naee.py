"""NAEE picks the kept subset a brute-force loop over pruned layers picks."""

import itertools
import math

import pytest
import torch

from moekit import MoE
from moekit.compress import build_compression, compress, prune_layer
from moekit.routers import TopK


@pytest.mark.parametrize("E,keep,k,renorm", [(5, 3, 2, True), (6, 2, 2, False), (4, 2, 1, True)])
@torch.no_grad()
def test_naee_picks_the_subset_a_brute_force_loop_picks(E, keep, k, renorm):
    torch.manual_seed(E + keep)
    moe = MoE(4, 6, E, router=TopK(k=k, renormalize=renorm), shared_d_ff=3).eval()
    with torch.no_grad():  # make the experts' sizes differ, so the subsets differ clearly
        moe.experts.down_proj.mul_(torch.linspace(0.2, 3.0, E)[:, None, None])
    model = torch.nn.Sequential(moe)
    x = torch.randn(64, 4)
    errors = {s: float((prune_layer(moe, list(s))(x) - moe(x)).norm()) for s in itertools.combinations(range(E), keep)}
    best = min(errors, key=errors.get)
    compress(model, "naee", [x[:40], x[40:]], num_experts=keep, max_tokens=100)
    pruned = model[0]
    assert pruned.num_experts == keep
    kept = [e for e in range(E) if any(torch.equal(moe.experts.down_proj[e], w) for w in pruned.experts.down_proj)]
    assert tuple(kept) == best


def test_naee_refuses_too_many_subsets_and_keeps_a_layer_it_cannot_shrink():
    moe = MoE(4, 6, 12, router=TopK(k=2)).eval()
    method = build_compression("naee", num_experts=6, max_subsets=100)
    with pytest.raises(ValueError, match=rf"C\(12, 6\) = {math.comb(12, 6)} subsets exceed max_subsets=100"):
        method.best_subset(moe, torch.randn(5, 4))
    model = torch.nn.Sequential(moe)
    compress(model, "naee", [torch.randn(5, 4)], num_experts=12)
    assert model[0] is moe
