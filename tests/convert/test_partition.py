"""Dense -> MoE by channels (moekit/convert/partition.py): DSMoE's partition (papers.md §4.2),
clustering, upcycling and pruning. Expected weights, channel sets and outputs are computed here from
the dense model's own tensors, never by the code under test."""

import pytest
import torch

from moekit import FFN, MoE, Routing
from moekit.convert import moe_from_ffn, partition_ffn
from moekit.convert.partition import (
    cluster_groups,
    contiguous_groups,
    partition,
    partition_gpt,
    prune,
    upcycle,
)
from moekit.models import GPT, GPTConfig

D, DFF, V = 16, 32, 50


def _gpt(seed=0, n_layers=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, d_model=D, n_layers=n_layers, n_heads=2, max_seq_len=16, d_ff=DFF)).eval()


def _every(T, E, dtype=torch.float32):
    return Routing(torch.arange(T).repeat_interleave(E), torch.arange(E).repeat(T), torch.ones(T * E, dtype=dtype), T, E)


def _hidden(ffn: FFN, x):
    """silu(x Wg^T) * (x Wu^T) in float64, from the dense FFN's weights."""
    x = x.double()
    g = x @ ffn.gate_proj.weight.detach().double().T
    u = x @ ffn.up_proj.weight.detach().double().T
    return g * torch.sigmoid(g) * u


def _expert_slices(moe: MoE, e: int):
    f = moe.experts.d_ff
    w1 = moe.experts.gate_up_proj[e]
    return w1[:f], w1[f:], moe.experts.down_proj[e]  # gate rows, up rows, down columns


# ----------------------------------------------------------------------------------- contiguous blocks


@pytest.mark.parametrize(("F", "E"), [(32, 1), (32, 4), (32, 8), (12, 3)])
def test_contiguous_groups_are_the_blocks(F, E):
    f = F // E
    assert contiguous_groups(F, E).tolist() == [[e * f + j for j in range(f)] for e in range(E)]


@pytest.mark.parametrize("E", [2, 4, 8])
def test_partition_experts_are_the_contiguous_blocks_of_the_dense_weights(E):
    """DSMoE: W_i, U_i are rows [i F/E, (i+1) F/E) of gate/up and V_i the same columns of down."""
    dense = _gpt()
    moe = partition(dense, E)
    f = DFF // E
    for i, (db, mb) in enumerate(zip(dense.blocks, moe.blocks)):
        assert isinstance(mb.ffn, MoE) and mb.ffn.num_experts == E and mb.ffn.d_ff == f
        assert moe.moekit_convert["layers"][i]["groups"] == [list(range(e * f, (e + 1) * f)) for e in range(E)]
        for e in range(E):
            lo, hi = e * f, (e + 1) * f
            gate, up, down = _expert_slices(mb.ffn, e)
            assert torch.equal(gate, db.ffn.gate_proj.weight[lo:hi])
            assert torch.equal(up, db.ffn.up_proj.weight[lo:hi])
            assert torch.equal(down, db.ffn.down_proj.weight[:, lo:hi])


def test_partition_ffn_and_moe_from_ffn_take_the_contiguous_blocks():
    torch.manual_seed(0)
    ffn = FFN(D, DFF, "swiglu")
    E, f = 4, DFF // 4
    for experts in (partition_ffn(ffn, E), moe_from_ffn(ffn, E, "softmax").experts):
        for e in range(E):
            lo, hi = e * f, (e + 1) * f
            assert torch.equal(experts.gate_up_proj[e], torch.cat([ffn.gate_proj.weight[lo:hi], ffn.up_proj.weight[lo:hi]]))
            assert torch.equal(experts.down_proj[e], ffn.down_proj.weight[:, lo:hi])


def test_one_expert_on_computes_its_block_of_the_dense_ffn():
    """o_i = (act(x W_i) * x U_i) V_i: expert i alone equals the dense FFN with every hidden channel
    outside block i zeroed (computed from the dense weights)."""
    torch.manual_seed(0)
    ffn = FFN(D, DFF, "swiglu")
    E, f = 4, DFF // 4
    moe = moe_from_ffn(ffn, E, "softmax")
    x = torch.randn(6, D)
    h = _hidden(ffn, x)
    for i in range(E):
        mask = torch.zeros(DFF, dtype=torch.float64)
        mask[i * f:(i + 1) * f] = 1
        want = (h * mask) @ ffn.down_proj.weight.detach().double().T
        only_i = Routing(torch.arange(6), torch.full((6,), i), torch.ones(6), 6, E)
        torch.testing.assert_close(moe(x, routing=only_i).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("E", [1, 2, 8])
def test_all_experts_on_equals_the_dense_ffn(activation, E):
    torch.manual_seed(0)
    ffn = FFN(16, 32, activation).double()
    moe = moe_from_ffn(ffn, E, "softmax").double()
    x = torch.randn(7, 16, dtype=torch.float64)
    assert (moe(x, routing=_every(7, E, torch.float64)) - ffn(x)).abs().max() <= 1e-12


def test_partition_errors():
    with pytest.raises(ValueError, match=r"num_experts=5 does not divide d_ff=32; valid counts: \[1, 2, 4, 8, 16, 32\]"):
        partition_ffn(FFN(16, 32), 5)
    with pytest.raises(TypeError, match="expected a moekit FFN"):
        partition_ffn(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="grouping must be 'contiguous' or 'cluster'"):
        partition(_gpt(), 4, grouping="strided")


def test_partition_gpt_copies_everything_and_cuts_every_ffn():
    dense = _gpt()
    moe = partition_gpt(dense, 4, "sigmoid_ste").eval()
    assert moe.config.layer_ffn(0)["d_ff"] == 8 and moe.config.layer_ffn(1)["router"] == "sigmoid_ste"
    d_state, m_state = dense.state_dict(), moe.state_dict()
    for k, v in d_state.items():
        if ".ffn." not in k:
            assert torch.equal(m_state[k], v), k
    x = torch.randn(5, 16)
    for db, mb in zip(dense.blocks, moe.blocks):
        torch.testing.assert_close(mb.ffn(x, routing=_every(5, 4)), db.ffn(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="num_experts=3 does not divide d_ff=32"):
        partition_gpt(dense, 3, "topk")


# ----------------------------------------------------------------------------------- clustered grouping


def _calibration(n=48, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, 16), generator=g)


@pytest.mark.parametrize("features", ["weights", "activations"])
def test_cluster_grouping_is_a_balanced_permutation_and_exact(features):
    dense = _gpt()
    E, f = 4, DFF // 4
    moe = partition(dense, E, grouping="cluster", features=features, calibration=_calibration())
    x = torch.randn(5, D)
    for i, (db, mb) in enumerate(zip(dense.blocks, moe.blocks)):
        groups = moe.moekit_convert["layers"][i]["groups"]
        assert [len(g) for g in groups] == [f] * E  # balanced
        assert sorted(c for g in groups for c in g) == list(range(DFF))  # a permutation of the channels
        assert groups != contiguous_groups(DFF, E).tolist()  # actually clustered
        for e, g in enumerate(groups):
            gate, up, down = _expert_slices(mb.ffn, e)
            assert torch.equal(gate, db.ffn.gate_proj.weight[g])
            assert torch.equal(up, db.ffn.up_proj.weight[g])
            assert torch.equal(down, db.ffn.down_proj.weight[:, g])
        torch.testing.assert_close(mb.ffn(x, routing=_every(5, E)), db.ffn(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_groups_recovers_planted_clusters(seed):
    """4 orthogonal directions, 6 channels each (small noise), shuffled: the balanced clusters are
    exactly the planted sets."""
    g = torch.Generator().manual_seed(seed)
    E, size, k = 4, 6, 8
    centers = torch.eye(k)[:E] * 5
    labels = torch.arange(E).repeat_interleave(size)[torch.randperm(E * size, generator=g)]
    feats = centers[labels] + 0.3 * torch.randn(E * size, k, generator=g)
    groups = cluster_groups(feats, E, seed=seed)
    assert groups.shape == (E, size)
    assert sorted(map(sorted, groups.tolist())) == sorted(sorted(torch.nonzero(labels == e).squeeze(1).tolist())
                                                          for e in range(E))
    assert all(row == sorted(row) for row in groups.tolist())


def test_cluster_groups_stays_balanced_on_unbalanced_clusters():
    """12 channels along one direction, 4 along another, E = 2: equal sizes all the same."""
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.tensor([[5.0, 0.0]]).repeat(12, 1), torch.tensor([[0.0, 5.0]]).repeat(4, 1)])
    feats = feats + 0.1 * torch.randn(16, 2, generator=g)
    groups = cluster_groups(feats, 2)
    assert [len(r) for r in groups.tolist()] == [8, 8]
    assert sorted(groups.flatten().tolist()) == list(range(16))
    # the small cluster (channels 12..15) lies whole in one expert
    assert any(set(range(12, 16)) <= set(r) for r in groups.tolist())


# ----------------------------------------------------------------------------------- upcycle


def test_upcycle_copies_the_ffn_into_every_expert_and_equals_dense():
    dense = _gpt()
    E = 4
    up = upcycle(dense, E, k=2).eval()
    x = torch.randn(6, D)
    for db, ub in zip(dense.blocks, up.blocks):
        assert ub.ffn.num_experts == E and ub.ffn.d_ff == DFF
        for e in range(E):
            gate, upw, down = _expert_slices(ub.ffn, e)
            assert torch.equal(gate, db.ffn.gate_proj.weight)
            assert torch.equal(upw, db.ffn.up_proj.weight)
            assert torch.equal(down, db.ffn.down_proj.weight)
        want = _hidden(db.ffn, x) @ db.ffn.down_proj.weight.detach().double().T
        torch.testing.assert_close(ub.ffn(x).double(), want, rtol=1e-5, atol=1e-6)  # TopK renormalised: sum w = 1
    ids = _calibration(4)
    torch.testing.assert_close(up(ids), dense(ids), rtol=1e-5, atol=1e-5)


def test_upcycle_expert_width_takes_the_first_channels():
    dense = _gpt()
    up = upcycle(dense, 3, k=1, expert_d_ff=16)
    for db, ub in zip(dense.blocks, up.blocks):
        for e in range(3):
            gate, upw, down = _expert_slices(ub.ffn, e)
            assert torch.equal(gate, db.ffn.gate_proj.weight[:16])
            assert torch.equal(upw, db.ffn.up_proj.weight[:16])
            assert torch.equal(down, db.ffn.down_proj.weight[:, :16])


# ----------------------------------------------------------------------------------- prune


def _mean_abs_hidden(dense: GPT, ids) -> list:
    """Per layer: mean over every calibration token of |silu(x Wg) * x Wu| per hidden channel, from the
    FFN's input (captured with a pre-hook) and the dense weights."""
    inputs = {i: [] for i in range(len(dense.blocks))}
    hooks = [b.ffn.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, D)))
             for i, b in enumerate(dense.blocks)]
    with torch.no_grad():
        dense(ids)
    for h in hooks:
        h.remove()
    return [_hidden(b.ffn, torch.cat(inputs[i])).abs().mean(0) for i, b in enumerate(dense.blocks)]


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_prune_keeps_the_channels_with_the_largest_mean_activation(keep):
    dense = _gpt(seed=3)
    ids = _calibration()
    scores = _mean_abs_hidden(dense, ids)
    pruned = prune(dense, keep, calibration=ids)
    n = round(keep * DFF)
    x = torch.randn(5, D)
    for i, (db, pb) in enumerate(zip(dense.blocks, pruned.blocks)):
        order = torch.argsort(scores[i], descending=True)
        s = scores[i][order]
        assert float(s[n - 1] - s[n]) > 1e-6 * float(s[0])  # no near-tie at the cut: the set is well defined
        want = sorted(order[:n].tolist())
        assert pruned.moekit_convert["layers"][i]["channels"] == want
        ffn = pb.ffn
        assert isinstance(ffn, FFN) and ffn.up_proj.out_features == n
        assert torch.equal(ffn.gate_proj.weight, db.ffn.gate_proj.weight[want])
        assert torch.equal(ffn.up_proj.weight, db.ffn.up_proj.weight[want])
        assert torch.equal(ffn.down_proj.weight, db.ffn.down_proj.weight[:, want])
        # = the dense FFN with the dropped channels zeroed
        mask = torch.zeros(DFF, dtype=torch.float64)
        mask[want] = 1
        torch.testing.assert_close(ffn(x).double(), (_hidden(db.ffn, x) * mask) @ db.ffn.down_proj.weight.detach().double().T,
                                   rtol=1e-5, atol=1e-6)


def test_prune_without_calibration_keeps_the_largest_weight_product():
    dense = _gpt(seed=4)
    pruned = prune(dense, 0.25)
    for i, db in enumerate(dense.blocks):
        w = db.ffn.requires_grad_(False)
        score = [float(w.up_proj.weight[c].norm() * w.down_proj.weight[:, c].norm() * w.gate_proj.weight[c].norm())
                 for c in range(DFF)]
        want = sorted(sorted(range(DFF), key=lambda c: -score[c])[:8])
        assert pruned.moekit_convert["layers"][i]["channels"] == want


def test_prune_keep_one_is_the_dense_model():
    dense = _gpt()
    ids = _calibration(4)
    full = prune(dense, 1.0, calibration=_calibration())
    torch.testing.assert_close(full(ids), dense(ids), rtol=1e-5, atol=1e-5)
    assert all(ly["channels"] == list(range(DFF)) for ly in full.moekit_convert["layers"])


def test_conversions_leave_the_input_model_untouched():
    dense = _gpt()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    partition(dense, 4)
    upcycle(dense, 2)
    prune(dense, 0.5, calibration=_calibration())
    after = dense.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(b.ffn, FFN) for b in dense.blocks)
