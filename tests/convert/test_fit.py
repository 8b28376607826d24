"""Routers fitted by least squares (moekit/convert/fit.py): the first layer's router solves the
ridge regression computed here from its inputs and its experts' channels."""

import pytest
import torch

from moekit.convert import fit_routers, partition, prune
from tests.convert.models import _gpt, _gpt_calibration


def test_fit_routers_solves_the_ridge_regression_of_the_first_layer():
    model = partition(_gpt(), 4, router="topk", router_args={"k": 2}).eval()
    ids = _gpt_calibration()
    moe = model.blocks[0].ffn
    xs = []
    h = moe.register_forward_pre_hook(lambda mod, args: xs.append(args[0].detach().reshape(-1, 16).double()))
    with torch.no_grad():
        for b in ids.split(8):
            model(b)
    h.remove()
    x = torch.cat(xs)
    assert fit_routers(model, ids, ridge=1e-3) == 2
    hid = torch.einsum("td,eod->teo", x, moe.experts.first_proj.detach().double())
    f = moe.experts.d_ff
    act = torch.nn.functional.silu(hid[..., :f]) * hid[..., f:]
    target = act.abs().mean(-1).clamp_min(1e-6).log()
    target = (target - target.mean(-1, keepdim=True)) / target.std()
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.linalg.solve(xb.T @ xb + 1e-3 * len(x) * torch.eye(17, dtype=x.dtype), xb.T @ target)[:-1]
    torch.testing.assert_close(moe.gate.weight.detach().double(), w.T, rtol=1e-3, atol=1e-4)


def test_fit_routers_needs_linear_routers_and_calibration():
    with pytest.raises(ValueError, match="no MoE layer with a linear router"):
        fit_routers(prune(_gpt(), 0.5), _gpt_calibration())
    with pytest.raises(ValueError, match="fit_routers: calibration text too small"):
        fit_routers(partition(_gpt(), 4, router="topk"), _gpt_calibration(1))
