"""The merged-expert router against a naive per-token loop: top-k over the original logits,
experts mapped to their groups, a token's picks in one group summed into one assignment."""

import pytest
import torch

from moekit.routers import GroupedTopK, TopK, build_router


def _naive(logits, groups, k, renorm):
    out = []
    for t, row in enumerate(torch.softmax(logits.double(), -1)):
        p, i = row.topk(k)
        if renorm:
            p = p / p.sum()
        per_group = {}
        for pe, ie in zip(p.tolist(), i.tolist()):
            per_group[groups[ie]] = per_group.get(groups[ie], 0.0) + pe
        out += [(t, g, w) for g, w in sorted(per_group.items())]
    return out


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_topk_matches_a_naive_per_token_sum(k, renorm):
    torch.manual_seed(k)
    groups = [0, 1, 0, 2, 1, 0]
    router = build_router("grouped", groups=groups, k=k, renormalize=renorm).bind(5, 3)
    assert isinstance(router, GroupedTopK) and router.weight.shape == (6, 5)
    x = torch.randn(40, 5)
    r = router(x)
    got = list(zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist()))
    want = _naive(r.logits, groups, k, renorm)
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in want]
    assert [w for *_, w in got] == pytest.approx([w for *_, w in want], abs=1e-6)
    assert r.num_experts == 3 and r.requested == 40 * k
    if k > 1:  # some token met a group twice: fewer assignments than picks
        assert r.num_assignments < 40 * k


def test_grouped_topk_losses_in_training_and_bad_configs():
    router = GroupedTopK([0, 0, 1, 1], k=2, balance=0.5, z_loss=0.1).bind(3, 2)
    router.train()
    r = router(torch.randn(8, 3))
    assert set(r.losses) == {"balance", "z_loss"} and all(v > 0 for v in r.losses.values())
    with pytest.raises(ValueError, match=r"groups \[1\] have no member"):
        GroupedTopK([0, 2, 0])
    with pytest.raises(ValueError, match="groups name 2 merged experts but the layer has num_experts=3"):
        GroupedTopK([0, 1, 0]).bind(4, 3)
    with pytest.raises(ValueError, match="k must lie in"):
        GroupedTopK([0, 1], k=3)


def test_without_groups_it_is_plain_top_k():
    torch.manual_seed(0)
    router = GroupedTopK(k=2).bind(5, 4)
    plain = TopK(k=2).bind(5, 4)
    plain.weight = router.weight
    x = torch.randn(30, 5)
    a, b = router(x), plain(x)
    assert router.groups == [0, 1, 2, 3]

    def dense(r):  # the same assignments, in any order
        return torch.zeros(30, 4).index_put((r.token, r.expert), r.weight.detach())

    torch.testing.assert_close(dense(a), dense(b))
