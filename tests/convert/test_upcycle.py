"""Sparse upcycling (moekit/convert/upcycle.py): every expert a copy of the dense FFN."""

import pytest
import torch

import moekit
from moekit.convert import upcycle
from moekit.routers import TopK
from tests.convert.models import (
    D_FF,
    DFF,
    FAMILIES,
    D,
    _dense,
    _expert_slices,
    _gpt,
    _gpt_calibration,
    _hidden,
    _ids,
    _loss,
    _max_diff,
    _moes,
    _out,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_upcycle_equals_the_dense_model(family):
    dense = _dense(family)
    ids = _ids()
    ref = _out(dense, ids)
    up = upcycle(dense, 4).eval()
    moes = _moes(up)
    assert len(moes) == 2
    for m in moes:
        assert isinstance(m.gate, TopK) and m.gate.k == 2 and m.gate.renormalize
        assert m.num_experts == 4 and m.d_ff == D_FF[family]
        w = m.experts.first_proj
        assert all(torch.equal(w[e], w[0]) for e in range(4))  # copies of the dense FFN
    with torch.no_grad():
        assert _max_diff(_out(up, ids), ref) <= 1e-5
    assert up.moekit_convert["method"] == "upcycle"


@pytest.mark.parametrize("family", ["gpt", "llama", "gpt2", "bert"])
def test_upcycled_model_trains(family):
    up = upcycle(_dense(family), 4).train()
    ids = _ids(4, 12)
    before = [m.experts.down_proj.detach().clone() for m in _moes(up)]
    opt = torch.optim.SGD(up.parameters(), lr=0.5)
    loss = _loss(up, ids) + moekit.aux_loss(up)
    assert torch.isfinite(loss)
    loss.backward()
    for m in _moes(up):
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
        assert m.experts.down_proj.grad is not None and m.experts.down_proj.grad.abs().sum() > 0
    opt.step()
    after = [m.experts.down_proj.detach() for m in _moes(up)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert torch.isfinite(_loss(up, ids))


def test_upcycle_expert_width_and_router_args():
    up = upcycle(_dense("llama"), 3, k=1, expert_d_ff=16)
    assert all(m.d_ff == 16 and m.gate.k == 1 for m in _moes(up))
    up = upcycle(_dense("llama"), 4, router="softmax")
    assert up.moekit_convert["settings"]["router"] == "softmax"
    with pytest.raises(ValueError, match=r"expert_d_ff must lie in \[1, 64\], got 65"):
        upcycle(_dense("llama"), 2, expert_d_ff=65)


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
    ids = _gpt_calibration(4)
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
