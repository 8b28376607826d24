"""DSMoE's partition (moekit/convert/partition.py, papers.md §4.2): experts are the dense FFN's channel
blocks or clusters, exact with every expert on, on tiny random models of every supported family.
Expected weights and outputs are computed here from the dense model's own tensors."""

import re

import pytest
import torch

import moekit
from moekit import FFN, MoE, Routing
from moekit.convert import active_fraction, contiguous_groups, moe_from_ffn, partition, partition_ffn
from moekit.convert.partition import partition_gpt
from moekit.routers import SigmoidSTE, TopK
from tests.convert.models import (
    D_FF,
    DFF,
    FAMILIES,
    D,
    _calibration,
    _dense,
    _every,
    _expert_slices,
    _force_all_on,
    _gpt,
    _gpt_calibration,
    _hidden,
    _ids,
    _loss,
    _max_diff,
    _moes,
    _out,
    _state,
)


@pytest.mark.parametrize("grouping,features", [("contiguous", "weights"), ("cluster", "weights"),
                                               ("cluster", "activations")])
@pytest.mark.parametrize("family", FAMILIES)
def test_partition_with_every_expert_on_equals_the_dense_model(family, grouping, features, monkeypatch):
    dense = _dense(family)
    before = _state(dense)
    ids = _ids()
    ref = _out(dense, ids)
    calib = _calibration() if features == "activations" else None
    moe = partition(dense, 4, grouping=grouping, features=features, calibration=calib).eval()

    # the input model is untouched, the copy has one 4-expert MoE per layer with the default router
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    assert not _moes(dense)
    moes = _moes(moe)
    assert len(moes) == 2
    assert all(m.num_experts == 4 and m.d_ff == D_FF[family] // 4 and isinstance(m.gate, SigmoidSTE) for m in moes)

    # every layer's groups are a partition of the hidden channels into equal sets
    info = moe.moekit_convert
    assert info["method"] == "partition" and info["settings"]["grouping"] == grouping
    for spec in info["layers"]:
        groups = torch.tensor(spec["groups"])
        assert groups.shape == (4, D_FF[family] // 4)
        assert torch.equal(groups.flatten().sort().values, torch.arange(D_FF[family]))
        if grouping == "contiguous":
            assert torch.equal(groups, contiguous_groups(D_FF[family], 4))

    _force_all_on(moe, monkeypatch)
    with torch.no_grad():
        out = _out(moe, ids)
    assert _max_diff(out, ref) <= 1e-5
    assert active_fraction(moe) == 1.0


def test_partition_clusters_differ_from_blocks_and_follow_the_seed():
    dense = _dense("llama")
    a = partition(dense, 4, grouping="cluster", seed=0).moekit_convert["layers"][0]["groups"]
    b = partition(dense, 4, grouping="cluster", seed=0).moekit_convert["layers"][0]["groups"]
    assert a == b
    assert a != contiguous_groups(64, 4).tolist()  # random weights: clusters are not the contiguous blocks


def test_partition_in_float64_is_exact(monkeypatch):
    dense = _dense("gpt2").double()
    ids = _ids()
    ref = _out(dense, ids)
    moe = partition(dense, 8, router="topk", router_args={"k": 2}).eval()
    assert {p.dtype for p in moe.parameters()} == {torch.float64}
    _force_all_on(moe, monkeypatch)
    with torch.no_grad():
        assert _max_diff(_out(moe, ids), ref) <= 1e-10


def test_partition_router_settings_reach_every_layer():
    moe = partition(_dense("qwen2"), 2, router="topk", router_args={"k": 1})
    assert all(isinstance(m.gate, TopK) and m.gate.k == 1 for m in _moes(moe))
    assert moe.moekit_convert["settings"]["router_args"] == {"k": 1}
    gpt = partition(_dense("gpt"), 2, router="topk", router_args={"k": 1})
    assert gpt.config.layer_ffn(1) == {"kind": "moe", "num_experts": 2, "d_ff": 32, "router": "topk",
                                       "router_args": {"k": 1}, "activation": "swiglu", "bias": False,
                                       "out_bias": False}
    assert gpt.config.extra["convert"]["method"] == "partition"


@pytest.mark.parametrize("family", FAMILIES)
def test_partitioned_model_trains_with_the_sparsity_loss(family):
    moe = partition(_dense(family), 4).train()
    ids = _ids(4, 12)
    loss = _loss(moe, ids)
    aux = moekit.aux_loss(moe)
    moes = _moes(moe)
    assert all(set(m.last_routing.losses) == {"sparsity"} for m in moes)
    torch.testing.assert_close(aux, sum(m.last_routing.losses["sparsity"] for m in moes))
    assert aux.item() > 0
    (loss + aux).backward()
    for m in moes:
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
        assert m.experts.first_proj.grad is not None and m.experts.first_proj.grad.abs().sum() > 0
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    router_before = moes[0].gate.weight.detach().clone()
    opt.step()
    assert not torch.equal(moes[0].gate.weight, router_before)
    assert torch.isfinite(_loss(moe, ids))


@pytest.mark.parametrize("family,E,valid", [("llama", 5, "[1, 2, 4, 8, 16, 32, 64]"),
                                            ("gpt2", 3, "[1, 2, 4, 8, 16, 32, 64]"),
                                            ("gpt", 0, "[1, 2, 4, 8, 16, 32, 64]")])
def test_expert_count_must_divide_the_hidden_width(family, E, valid):
    with pytest.raises(ValueError, match=f"num_experts={E} does not divide d_ff={D_FF[family]}; "
                                         f"valid counts: {re.escape(valid)}"):
        partition(_dense(family), E)


def test_bad_partition_settings():
    dense = _dense("gpt")
    with pytest.raises(ValueError, match="grouping must be 'contiguous' or 'cluster', got 'random'"):
        partition(dense, 2, grouping="random")
    with pytest.raises(ValueError, match="features must be 'weights' or 'activations'"):
        partition(dense, 2, grouping="cluster", features="gradients")
    with pytest.raises(TypeError, match="pass the router by name"):
        partition(dense, 2, router=TopK(k=1))
    with pytest.raises(ValueError, match="layer 0 of the GPT is not a dense FFN"):
        partition(partition(dense, 2), 2)


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


@pytest.mark.parametrize("features", ["weights", "activations"])
def test_cluster_grouping_is_a_balanced_permutation_and_exact(features):
    dense = _gpt()
    E, f = 4, DFF // 4
    moe = partition(dense, E, grouping="cluster", features=features, calibration=_gpt_calibration())
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
