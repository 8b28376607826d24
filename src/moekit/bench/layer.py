"""`moekit bench layer`: moekit.MoE against Hugging Face's eager Mixtral block and a dense FFN.

All three run in one process on the same input, fp32, with the same expert weights for moekit
and Hugging Face. The dense SwiGLU FFN has the MoE's *active* parameters (hidden width k * d_ff),
the practical ceiling for an MoE layer on one device. Throughput is tokens/s from the median of
repeated runs; ratios compare numbers measured in this same run.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..layer import FFN, MoE
from ..routers import TopK
from .timing import median_time


@dataclass
class LayerCase:
    name: str
    T: int
    d: int
    d_ff: int
    E: int
    k: int


CASES = [
    LayerCase("coarse", T=4096, d=512, d_ff=1408, E=8, k=2),
    LayerCase("fine-grained", T=1024, d=512, d_ff=256, E=64, k=6),
]
QUICK_CASES = [
    LayerCase("coarse-small", T=512, d=128, d_ff=256, E=8, k=2),
    LayerCase("fine-small", T=256, d=128, d_ff=64, E=32, k=4),
]


def _hf_block(moe: MoE, case: LayerCase):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from ..convert.hf import to_hf

    cfg = MixtralConfig(
        hidden_size=case.d,
        intermediate_size=case.d_ff,
        num_local_experts=case.E,
        num_experts_per_tok=case.k,
        experts_implementation="eager",
    )
    return to_hf(moe, like=MixtralSparseMoeBlock(cfg))


def _timers(module, x, grad, repeats):
    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return median_time(fwd, repeats), median_time(fwd_bwd, repeats)


def run_layer_bench(quick: bool = False, repeats: int | None = None, out: str | os.PathLike | None = None,
                    hf: bool = True, console=None) -> dict:
    """Run the benchmark; print a table; write JSON to ``out`` if given. Returns the results."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cases = QUICK_CASES if quick else CASES
    repeats = repeats or (3 if quick else 7)
    torch.manual_seed(0)
    results = []
    for case in cases:
        x = torch.randn(1, case.T, case.d, requires_grad=True)  # [B, S, D]: HF blocks want 3D
        grad = torch.randn(1, case.T, case.d)
        moe = MoE(case.d, case.d_ff, case.E, router=TopK(case.k), check_finite=False)
        dense = FFN(case.d, case.k * case.d_ff)
        impls = {"dense (equal active)": dense, "moekit": moe}
        for backend in ("loop", "grouped_mm"):
            m = MoE(case.d, case.d_ff, case.E, router=TopK(case.k), check_finite=False, backend=backend)
            m.load_state_dict(moe.state_dict())
            impls[f"moekit ({backend})"] = m
        if hf:
            impls["HF Mixtral eager"] = _hf_block(moe, case)
        row = {"case": asdict(case), "impls": {}}
        for name, module in impls.items():
            module.train()
            console.print(f"[dim]{case.name}: {name}...[/dim]")
            t_f, t_fb = _timers(module, x, grad, repeats)
            row["impls"][name] = {
                "forward_s": t_f,
                "forward_tok_s": case.T / t_f,
                "fwd_bwd_s": t_fb,
                "fwd_bwd_tok_s": case.T / t_fb,
            }
        r = row["impls"]
        row["ratios"] = {
            "forward_vs_dense": r["moekit"]["forward_tok_s"] / r["dense (equal active)"]["forward_tok_s"],
            "fwd_bwd_vs_dense": r["moekit"]["fwd_bwd_tok_s"] / r["dense (equal active)"]["fwd_bwd_tok_s"],
        }
        if hf:
            row["ratios"]["forward_vs_hf"] = r["moekit"]["forward_tok_s"] / r["HF Mixtral eager"]["forward_tok_s"]
            row["ratios"]["fwd_bwd_vs_hf"] = r["moekit"]["fwd_bwd_tok_s"] / r["HF Mixtral eager"]["fwd_bwd_tok_s"]
        results.append(row)

    table = Table(title=f"moekit bench layer (fp32, {torch.get_num_threads()} threads, median of {repeats})")
    for col in ("case", "implementation", "fwd tok/s", "fwd+bwd tok/s", "fwd vs dense", "fwd+bwd vs dense"):
        table.add_column(col, justify="left" if col in ("case", "implementation") else "right", no_wrap=True)
    for row in results:
        c = row["case"]
        label = c["name"]
        dense = row["impls"]["dense (equal active)"]
        for name, v in row["impls"].items():
            table.add_row(
                label, name, f"{v['forward_tok_s']:,.0f}", f"{v['fwd_bwd_tok_s']:,.0f}",
                f"{v['forward_tok_s'] / dense['forward_tok_s']:.2f}x",
                f"{v['fwd_bwd_tok_s'] / dense['fwd_bwd_tok_s']:.2f}x",
            )
            label = f"T={c['T']} d={c['d']}" if name.startswith("dense") else (
                f"d_ff={c['d_ff']} E={c['E']} k={c['k']}" if name == "moekit" else "")
        table.add_section()
    console.print(table)
    for row in results:
        console.print(f"{row['case']['name']}: " + ", ".join(f"{k}={v:.2f}x" for k, v in row["ratios"].items()))
    report = {
        "benchmark": "layer",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "repeats": repeats,
        "results": results,
    }
    if out is not None:
        from ..io import atomic_write_text

        atomic_write_text(Path(out), json.dumps(report, indent=2))
        console.print(f"wrote {out}")
    return report
