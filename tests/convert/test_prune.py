"""Structured pruning (moekit/convert/prune.py and the channel importance of
moekit/convert/calibration.py): the kept channels, computed here from the dense model's own tensors."""

import pytest
import torch

from moekit import FFN
from moekit.convert import prune
from tests.convert.models import (
    D_FF,
    DFF,
    FAMILIES,
    D,
    _calibration,
    _dense,
    _gpt,
    _gpt_calibration,
    _hidden,
    _hidden_widths,
    _ids,
    _max_diff,
    _mean_abs_hidden,
    _out,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_keep_all_equals_dense_and_half_halves(family):
    dense = _dense(family)
    ids = _ids()
    ref = _out(dense, ids)
    full = prune(dense, 1.0).eval()
    assert _hidden_widths(full) == [D_FF[family]] * 2
    with torch.no_grad():
        assert _max_diff(_out(full, ids), ref) <= 1e-5
    half = prune(dense, 0.5).eval()
    assert _hidden_widths(half) == [D_FF[family] // 2] * 2
    assert [len(s["channels"]) for s in half.moekit_convert["layers"]] == [D_FF[family] // 2] * 2
    assert half.moekit_convert["settings"] == {"keep": 0.5, "score": "weight"}
    with torch.no_grad():
        assert torch.isfinite(_out(half, ids)).all()


def test_prune_without_calibration_keeps_the_largest_weight_norms():
    dense = _dense("gpt2")
    half = prune(dense, 0.25)
    mlp = dense.transformer.h[1].mlp
    up, down = mlp.c_fc.weight.T, mlp.c_proj.weight.T  # Conv1D stores [in, out]
    score = up.norm(dim=1) * down.norm(dim=0)
    want = torch.topk(score, 32).indices.sort().values
    assert half.moekit_convert["layers"][1]["channels"] == want.tolist()
    conv = half.transformer.h[1].mlp
    torch.testing.assert_close(conv.ffn.up_proj.weight, up[want], rtol=0, atol=0)
    torch.testing.assert_close(conv.ffn.up_proj.bias, mlp.c_fc.bias[want], rtol=0, atol=0)
    torch.testing.assert_close(conv.out_bias, mlp.c_proj.bias, rtol=0, atol=0)


def test_prune_with_calibration_keeps_the_most_active_channels():
    dense = _dense("gpt")
    calib = _calibration()
    # direct computation: mean |input of down_proj| over every calibration token, layer 0
    seen = []
    h = dense.blocks[0].ffn.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        dense(calib)
    h.remove()
    score = torch.cat(seen).abs().mean(0)
    want = torch.topk(score, 32).indices.sort().values

    pruned = prune(dense, 0.5, calibration=calib)
    assert pruned.moekit_convert["settings"] == {"keep": 0.5, "score": "activation"}
    assert pruned.moekit_convert["layers"][0]["channels"] == want.tolist()
    src, dst = dense.blocks[0].ffn, pruned.blocks[0].ffn
    assert isinstance(dst, FFN) and dst.up_proj.out_features == 32 and pruned.config.layer_ffn(0)["d_ff"] == 32
    assert torch.equal(dst.up_proj.weight, src.up_proj.weight[want])
    assert torch.equal(dst.gate_proj.weight, src.gate_proj.weight[want])
    assert torch.equal(dst.down_proj.weight, src.down_proj.weight[:, want])
    # the calibration (weight-free) ranking is not the weight-norm one on this model
    assert prune(dense, 0.5).moekit_convert["layers"][0]["channels"] != want.tolist()


def test_prune_errors():
    for keep in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep must lie in"):
            prune(_dense("gpt"), keep)


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_prune_keeps_the_channels_with_the_largest_mean_activation(keep):
    dense = _gpt(seed=3)
    ids = _gpt_calibration()
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
    ids = _gpt_calibration(4)
    full = prune(dense, 1.0, calibration=_gpt_calibration())
    torch.testing.assert_close(full(ids), dense(ids), rtol=1e-5, atol=1e-5)
    assert all(ly["channels"] == list(range(DFF)) for ly in full.moekit_convert["layers"])
