"""Score pruning: which experts each score keeps, layer-wise and global, against hand-made statistics."""

import pytest
import torch

from moekit import MoE
from moekit.compress import ExpertStats, build_compression
from moekit.compress.prune import global_keep, keep_top
from moekit.routers import TopK


def _stats(tokens, layer="l", k=2, soft=None, reap=None):
    st = ExpertStats.empty(len(tokens), layer=layer, k=k)
    st.tokens += torch.tensor(tokens)
    if soft is not None:
        st.soft += torch.tensor(soft, dtype=torch.float64)
    if reap is not None:  # saliency = reap_sum / tokens
        st.reap_sum += torch.tensor(reap, dtype=torch.float64) * st.tokens.clamp_min(1)
    return st


def _moe(E=5):
    torch.manual_seed(0)
    return MoE(4, 6, E, router=TopK(k=2)).eval()


def _kept(method, moe, st):
    """Ids of ``moe``'s experts the compressed layer kept (matched by their down projections)."""
    out = method.compress_layer(moe, st)
    return [e for e in range(moe.num_experts)
            if any(torch.equal(moe.experts.down_proj[e], w) for w in out.experts.down_proj)]


def test_each_score_keeps_its_own_best_experts():
    moe = _moe()
    st = _stats([5, 1, 9, 1, 0], soft=[0.1, 3.0, 0.2, 2.0, 0.5], reap=[1.0, 0.2, 0.1, 0.9, 0.0])
    assert _kept(build_compression("prune-count", num_experts=2), moe, st) == [0, 2]
    assert _kept(build_compression("prune-soft", num_experts=2), moe, st) == [1, 3]
    assert _kept(build_compression("reap", num_experts=2), moe, st) == [0, 3]
    # ties go to the lower id
    assert _kept(build_compression("prune-count", num_experts=3), moe, st) == [0, 1, 2]
    assert build_compression("prune-count", num_experts=5).compress_layer(moe, st) is moe


def test_random_pruning_is_seeded_per_layer():
    moe = _moe(8)
    a = _kept(build_compression("prune-random", num_experts=4, seed=1), moe, _stats([1] * 8, layer="a"))
    again = _kept(build_compression("prune-random", num_experts=4, seed=1), moe, _stats([1] * 8, layer="a"))
    others = {tuple(_kept(build_compression("prune-random", num_experts=4, seed=s), moe, _stats([1] * 8, layer=n)))
              for s in range(3) for n in "abc"}
    assert a == again and len(a) == 4 and len(others) > 3


def test_global_pruning_ranks_across_layers_and_never_leaves_a_layer_below_k():
    # fractions of each layer's total: a = [.5, .3, .2, 0], b = [.26, .25, .25, .24]
    scores = {"a": torch.tensor([50.0, 30, 20, 0]), "b": torch.tensor([26.0, 25, 25, 24])}
    kept = global_keep(scores, 4, {"a": 2, "b": 2})
    assert kept["a"].tolist() == [0, 1] and kept["b"].tolist() == [0, 1]  # each layer's k first
    # after the reserved best of each (a0 .5, b0 .26): a1 .3, then b1 .25 and b2 .25 (b before a2 .2)
    kept = global_keep(scores, 5, {"a": 1, "b": 1})
    assert kept["a"].tolist() == [0, 1] and kept["b"].tolist() == [0, 1, 2]
    kept = global_keep({"a": torch.tensor([50.0, 30, 20, 0]), "b": torch.tensor([97.0, 1, 1, 1])}, 5,
                       {"a": 1, "b": 1})
    assert kept["a"].tolist() == [0, 1, 2] and kept["b"].tolist() == [0, 1]
    # fractions, not raw scores: a small layer's best expert outranks a large layer's fourth
    kept = global_keep({"a": torch.tensor([5.0, 3, 2, 0]), "b": torch.tensor([260.0, 250, 250, 240])}, 5,
                       {"a": 1, "b": 1})
    assert kept["a"].tolist() == [0, 1] and kept["b"].tolist() == [0, 1, 2]
    # by rank alone "b" would keep only expert 0 (b0 .97 > a0 .4 > a1 .3 = a2 .3); its k = 2 comes first
    kept = global_keep({"a": torch.tensor([40.0, 30, 30, 0]), "b": torch.tensor([97.0, 1, 1, 1])}, 4,
                       {"a": 2, "b": 2})
    assert kept["a"].tolist() == [0, 1] and kept["b"].tolist() == [0, 1]
    method = build_compression("prune-count", num_experts=2, scope="global")
    stats = {"a": _stats([50, 30, 20, 0], "a", k=2), "b": _stats([0, 0, 10, 100], "b", k=2)}
    method.prepare(stats)
    assert method._global["a"].tolist() == [0, 1] and method._global["b"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="cannot leave every layer its k"):
        global_keep(scores, 3, {"a": 2, "b": 2})


def test_keep_top_and_bad_settings():
    assert keep_top(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global'"):
        build_compression("prune-count", num_experts=2, scope="all")
    with pytest.raises(ValueError, match="num_experts must lie in"):
        build_compression("reap", num_experts=0)
    st = _stats([1, 2, 3, 4, 5])
    st.soft[:] = torch.nan
    with pytest.raises(ValueError, match="soft mass is unknown; use hard counts"):
        build_compression("prune-soft", num_experts=2).compress_layer(_moe(), st)
