"""moekit bench layer: the quick run through the CLI, the compiled rows and the ratios on a tiny case, CUDA."""

import functools
import json

import pytest
import torch

from moekit.apps.bench.layer import LayerCase, run_layer_bench
from moekit.apps.cli.main import main

TINY = [LayerCase("tiny", T=32, d=16, d_ff=32, E=4, k=2)]


def test_bench_layer_quick_writes_json(tmp_path):
    out = tmp_path / "layer.json"
    assert main(["bench", "layer", "--quick", "--repeats", "1", "--no-compile", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "layer" and len(report["results"]) == 2 and report["device"] == "cpu"
    row = report["results"][0]
    assert {"dense (equal active)", "moekit", "HF Mixtral eager"} <= set(row["impls"])
    assert row["ratios"]["forward_vs_dense"] > 0
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_bench_layer_compiled_rows_and_ceiling_ratios(tmp_path, monkeypatch):
    # the rows' plumbing, not inductor (tests/test_compile.py): dynamo's eager backend compiles in a second
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    report = run_layer_bench(cases=TINY, repeats=1, hf=False, out=tmp_path / "layer.json")
    row = report["results"][0]
    impls, ratios = row["impls"], row["ratios"]
    for name in ("moekit (compiled)", "dense (compiled)"):
        assert impls[name]["compile_s"]["forward"] > 0 and impls[name]["compile_s"]["fwd_bwd"] > 0
    assert "compile_s" not in impls["moekit"]  # eager rows have no compile time
    # each ratio is the quotient of the times of this same run
    ceiling_f = min(impls[f"experts only ({b})"]["forward_s"] for b in ("loop", "grouped_mm"))
    assert ratios["forward_vs_experts_only"] == pytest.approx(ceiling_f / impls["moekit"]["forward_s"])
    ceiling_fb = min(impls[f"experts only ({b})"]["fwd_bwd_s"] for b in ("loop", "grouped_mm"))
    assert ratios["compiled_fwd_bwd_vs_experts_only"] == pytest.approx(
        ceiling_fb / impls["moekit (compiled)"]["fwd_bwd_s"])
    assert ratios["compiled_forward_vs_compiled_dense"] == pytest.approx(
        impls["dense (compiled)"]["forward_s"] / impls["moekit (compiled)"]["forward_s"])
    assert json.loads((tmp_path / "layer.json").read_text())["results"][0]["ratios"] == pytest.approx(ratios)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_layer_on_cuda(tmp_path):
    report = run_layer_bench(cases=TINY, repeats=1, hf=False, device="cuda", out=tmp_path / "layer.json")
    assert report["device"] != "cpu"
    assert all(v["forward_s"] > 0 and v["fwd_bwd_s"] > 0 for v in report["results"][0]["impls"].values())
    assert report["results"][0]["ratios"]["compiled_forward_vs_experts_only"] > 0


def test_bench_layer_cuda_without_a_device_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "layer", "--quick", "--device", "cuda", "--out", str(tmp_path / "l.json")]) != 0
    err = capsys.readouterr().err
    assert "cuda" in err and err.count("\n") == 1  # a one-line error naming the device
    assert not (tmp_path / "l.json").exists()
