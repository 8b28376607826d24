"""`moekit experiment dsmoe` (moekit/apps/experiments/dsmoe.py): the top-k baseline's conversion, and the
quick run end to end (structure and the values that follow from the setup)."""

import json
import math
import statistics

import pytest
import torch

from moekit import MoE
from moekit.apps.cli.main import main
from moekit.apps.experiments import dsmoe
from moekit.convert.partition import partition_gpt
from moekit.models import GPT, GPTConfig

D, DFF, E = 16, 64, 8


def _dense():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, d_model=D, n_layers=2, n_heads=2, max_seq_len=16, d_ff=DFF)).eval()


def _dense_ffn_on_blocks(ffn, x, blocks_T):
    """The dense FFN with every hidden channel outside each token's chosen blocks zeroed (float64)."""
    xd = x.double()
    g = xd @ ffn.gate_proj.weight.detach().double().T
    u = xd @ ffn.up_proj.weight.detach().double().T
    h = g * torch.sigmoid(g) * u
    f = DFF // E
    mask = torch.zeros_like(h)
    for t, chosen in enumerate(blocks_T):
        for e in chosen:
            mask[t, e * f:(e + 1) * f] = 1
    return (h * mask) @ ffn.down_proj.weight.detach().double().T


@pytest.mark.parametrize("k", [2, 3, 8])
def test_topk_baseline_has_the_dense_magnitude_right_after_conversion(k):
    """With equal router probabilities (router weight 0), scale = k makes each chosen block's weight
    exactly 1, so the converted FFN is the dense FFN restricted to the k chosen blocks (at k = 8: the
    dense FFN itself); without it every weight is 1/k and the output a k-th of that."""
    args = dsmoe.topk_baseline_args(k)
    assert args["k"] == k and args["renormalize"] and args["scale"] == k
    dense = _dense()
    moe = partition_gpt(dense, E, "topk", args).eval()
    x = torch.randn(10, D)
    for db, mb in zip(dense.blocks, moe.blocks):
        assert isinstance(mb.ffn, MoE)
        with torch.no_grad():
            mb.ffn.gate.weight.zero_()
        y = mb.ffn(x).double()
        r = mb.ffn.last_routing
        assert r.num_assignments == 10 * k
        torch.testing.assert_close(r.weight.double(), torch.ones(10 * k, dtype=torch.float64))
        chosen = [r.expert[r.token == t].tolist() for t in range(10)]
        torch.testing.assert_close(y, _dense_ffn_on_blocks(db.ffn, x, chosen), rtol=1e-5, atol=1e-6)
        if k == E:
            torch.testing.assert_close(y, db.ffn(x).double(), rtol=1e-5, atol=1e-6)


def test_topk_baseline_top1_keeps_the_raw_probability():
    assert dsmoe.topk_baseline_args(1) == {"k": 1, "renormalize": False, "scale": 1.0}


def test_experiment_dsmoe_quick(tmp_path):
    assert main(["experiment", "dsmoe", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "dsmoe.png").read_bytes()[:4] == b"\x89PNG"
    assert result["experiment"] == "dsmoe" and result["seeds"] == 1
    assert (result["pretrain_steps"], result["steps"], result["finetune_lr"]) == (30, 20, 3e-4)  # quick mode
    assert math.isfinite(result["pretrained_ppl"]) and result["pretrained_ppl"] > 1 and result["wall_s"] > 0
    n_layers = 2  # the quick demo model

    runs = {r["variant"]: r for r in result["runs"]}
    assert list(runs) == list(dsmoe.PAPER) and len(result["runs"]) == 4
    for name, r in runs.items():
        assert r["seed"] == 0
        assert math.isfinite(r["val_ppl"]) and r["val_ppl"] > 1, name
        assert 0 <= r["mean_active"] <= E, name
        assert [h["step"] for h in r["history"] if "loss" in h][-1] == 20, name
        assert all(math.isfinite(h["loss"]) for h in r["history"] if "loss" in h), name
        if name == "dense (trained on)":
            assert r["layers"] == [] and r["mean_active"] == E and r["router_args"] is None
            continue
        assert len(r["layers"]) == n_layers, name
        assert all(0 <= ly["mean_experts"] <= E and 0 <= ly["dead_experts"] <= E for ly in r["layers"]), name
        assert r["mean_active"] == pytest.approx(statistics.mean(ly["mean_experts"] for ly in r["layers"]))
        assert r["dead"] == sum(ly["dead_experts"] for ly in r["layers"])

    ste, no_ste, topk = runs["DSMoE (STE)"], runs["no-STE ablation"], runs["top-k softmax"]
    sparsity = 1.0 / n_layers  # the paper's average over layers, coefficient 1
    assert ste["router_args"] == {"sparsity": sparsity}
    assert no_ste["router_args"] == {"sparsity": sparsity, "ste": False}
    k = max(1, round(ste["mean_active"]))  # top-k matched to DSMoE's mean active experts
    assert topk["k"] == k and topk["router_args"] == {"k": k, "renormalize": k > 1, "scale": float(k)}
    assert topk["mean_active"] == pytest.approx(k)  # every token gets exactly k experts
    assert topk["dead"] == 0 or k < E

    summary = {s["variant"]: s for s in result["summary"]}
    assert list(summary) == list(dsmoe.PAPER)
    for name, s in summary.items():
        assert s["val_ppl"] == pytest.approx(runs[name]["val_ppl"]) and s["val_ppl_sd"] == 0  # one seed
        assert s["mean_active"] == pytest.approx(runs[name]["mean_active"])
        assert s["paper_ppl"] == dsmoe.PAPER[name] and s["k"] == runs[name]["k"]
    md = dsmoe.report_markdown(result)
    assert f"top-k softmax (k={k})" in md and "DSMoE (STE)" in md
