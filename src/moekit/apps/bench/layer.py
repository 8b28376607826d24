"""`moekit bench layer`: moekit.MoE against Hugging Face's eager Mixtral block and a dense FFN.

All run in one process on the same input, fp32, with the same expert weights for moekit and
Hugging Face. The dense SwiGLU FFN has the MoE's *active* parameters (hidden width k * d_ff),
the practical ceiling for an MoE layer on one device; the expert FFNs alone on already-dispatched
rows ("experts only") are the ceiling of moekit's layer, whose routing and dispatch cost the rest.
``torch.compile`` rows (moekit's layer and the dense FFN) are timed after their compilation, whose
time is reported apart (``compile_s``). Throughput is tokens/s from the median of repeated runs;
ratios compare numbers measured in this same run.
"""

from __future__ import annotations

import copy
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from moekit.apps.bench.timing import first_call_s, interleaved_medians, keep_freed_memory, synchronized
from moekit.convert.hf import to_hf
from moekit.experts import available_backends, select_backend
from moekit.io import atomic_write_text, dumps
from moekit.layer import FFN, MoE
from moekit.routers import TopK


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
    from transformers import MixtralConfig  # optional: only this arm needs transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=case.d,
        intermediate_size=case.d_ff,
        num_local_experts=case.E,
        num_experts_per_tok=case.k,
        experts_implementation="eager",
    )
    return to_hf(moe, like=MixtralSparseMoeBlock(cfg))


def _fwd(module, x):
    def run():
        module.eval()
        with torch.no_grad():
            module(x)

    return run


def _fwd_bwd(module, x, grad):
    def run():
        module.train()
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return run


def _experts_only(moe: MoE, x, backend: str):
    """The expert FFNs alone on already-dispatched rows: the ceiling for the whole layer."""
    experts = copy.deepcopy(moe.experts)
    experts.backend = backend
    x_TD = x.detach().reshape(-1, moe.d_model)
    with torch.no_grad():
        x_ND, seg, _ = moe.dispatcher.dispatch(x_TD, moe.gate(x_TD))
    x_ND = x_ND.clone().requires_grad_(True)
    g_ND = torch.randn_like(x_ND)

    def fwd():
        with torch.no_grad():
            experts(x_ND, seg)

    def fwd_bwd():
        experts.zero_grad(set_to_none=True)
        x_ND.grad = None
        experts(x_ND, seg).backward(g_ND)

    return fwd, fwd_bwd


DENSE = "dense (equal active)"
COMPILED = {"moekit (compiled)": "moekit", "dense (compiled)": DENSE}  # torch.compile row -> the module it compiles


def _able_backends(moe: MoE, x) -> list[str]:
    """The expert backends that can run this layer on ``x`` (device, dtype, widths)."""
    able = []
    for backend in available_backends():
        try:
            select_backend(x.reshape(-1, moe.d_model), moe.experts, backend)
        except ValueError:
            continue
        able.append(backend)
    return able


def _impls(case: LayerCase, hf: bool, x) -> tuple[dict, MoE]:
    """The modules timed on one case: the dense FFN, moekit (automatic backend and each able one), HF."""
    moe = MoE(case.d, case.d_ff, case.E, router=TopK(case.k), check_finite=False).to(x.device).train()
    impls = {DENSE: FFN(case.d, case.k * case.d_ff).to(x.device), "moekit": moe}
    for backend in _able_backends(moe, x):
        m = MoE(case.d, case.d_ff, case.E, router=TopK(case.k), check_finite=False, backend=backend).to(x.device)
        m.load_state_dict(moe.state_dict())
        impls[f"moekit ({backend})"] = m.train()
    if hf:
        impls["HF Mixtral eager"] = _hf_block(moe, case).to(x.device).train()
    return impls, moe


def _timed(case: LayerCase, hf: bool, device: torch.device, compiled: bool) -> tuple[dict, dict, dict]:
    """The forward and the forward+backward closures of every implementation on one input, and the
    compile time of the compiled ones (their first calls, made here so that no timing includes them)."""
    x = torch.randn(1, case.T, case.d, device=device, requires_grad=True)  # [B, S, D]: HF blocks want 3D
    grad = torch.randn(1, case.T, case.d, device=device)
    impls, moe = _impls(case, hf, x)
    if compiled:
        torch._dynamo.reset()  # compile for this case's shapes (not dynamic ones carried over from the last)
        for name, of in COMPILED.items():
            impls[name] = torch.compile(impls[of])
    fwd = {name: _fwd(m, x) for name, m in impls.items()}
    fwd_bwd = {name: _fwd_bwd(m, x, grad) for name, m in impls.items()}
    for backend in _able_backends(moe, x):
        fwd[f"experts only ({backend})"], fwd_bwd[f"experts only ({backend})"] = _experts_only(moe, x, backend)
    fwd = {name: synchronized(fn, device) for name, fn in fwd.items()}
    fwd_bwd = {name: synchronized(fn, device) for name, fn in fwd_bwd.items()}
    compile_s = {name: {"forward": first_call_s(fwd[name]), "fwd_bwd": first_call_s(fwd_bwd[name])}
                 for name in impls if name in COMPILED}
    return fwd, fwd_bwd, compile_s


def _ratios(t_f: dict[str, float], t_fb: dict[str, float], hf: bool) -> dict[str, float]:
    """moekit's speed relative to the dense FFN, to its experts-only ceiling (the fastest backend's
    experts alone) and to HF; the compiled layer's to the compiled dense FFN and to the same ceiling."""
    ceiling_f = min(t for name, t in t_f.items() if name.startswith("experts only"))
    ceiling_fb = min(t for name, t in t_fb.items() if name.startswith("experts only"))
    ratios = {
        "forward_vs_dense": t_f[DENSE] / t_f["moekit"],
        "fwd_bwd_vs_dense": t_fb[DENSE] / t_fb["moekit"],
        "experts_only_forward_vs_dense": t_f[DENSE] / ceiling_f,
        "experts_only_fwd_bwd_vs_dense": t_fb[DENSE] / ceiling_fb,
        "forward_vs_experts_only": ceiling_f / t_f["moekit"],
        "fwd_bwd_vs_experts_only": ceiling_fb / t_fb["moekit"],
    }
    if "moekit (compiled)" in t_f:
        mc, dc = "moekit (compiled)", "dense (compiled)"
        ratios.update({
            "compiled_forward_vs_compiled_dense": t_f[dc] / t_f[mc],
            "compiled_fwd_bwd_vs_compiled_dense": t_fb[dc] / t_fb[mc],
            "compiled_forward_vs_experts_only": ceiling_f / t_f[mc],
            "compiled_fwd_bwd_vs_experts_only": ceiling_fb / t_fb[mc],
            "compiled_forward_vs_eager": t_f["moekit"] / t_f[mc],
            "compiled_fwd_bwd_vs_eager": t_fb["moekit"] / t_fb[mc],
        })
    if hf:
        ratios["forward_vs_hf"] = t_f["HF Mixtral eager"] / t_f["moekit"]
        ratios["fwd_bwd_vs_hf"] = t_fb["HF Mixtral eager"] / t_fb["moekit"]
    return ratios


def _row(case: LayerCase, t_f: dict[str, float], t_fb: dict[str, float], compile_s: dict, hf: bool) -> dict:
    """One case's tokens/s per implementation (compile time apart) and the ratios of :func:`_ratios`."""
    row = {"case": asdict(case), "impls": {}}
    for name in t_f:
        row["impls"][name] = {
            "forward_s": t_f[name],
            "forward_tok_s": case.T / t_f[name],
            "fwd_bwd_s": t_fb[name],
            "fwd_bwd_tok_s": case.T / t_fb[name],
        }
        if name in compile_s:
            row["impls"][name]["compile_s"] = compile_s[name]
    row["ratios"] = _ratios(t_f, t_fb, hf)
    return row


def _print_results(console, results: list[dict], repeats: int, tuned: bool, device: torch.device) -> None:
    """The table of tokens/s against the dense FFN, then moekit against its experts-only ceiling."""
    table = Table(
        title=f"moekit bench layer (fp32, {device.type}, {torch.get_num_threads()} threads, median of {repeats}, "
        f"malloc tuning {'on' if tuned else 'off'})"
    )
    for col in ("case", "implementation", "fwd tok/s", "fwd+bwd tok/s", "fwd vs dense", "fwd+bwd vs dense",
                "compile s"):
        table.add_column(col, justify="left" if col in ("case", "implementation") else "right", no_wrap=True)
    for row in results:
        c = row["case"]
        label = c["name"]
        dense = row["impls"][DENSE]
        for name, v in row["impls"].items():
            comp = v.get("compile_s")
            table.add_row(
                label, name, f"{v['forward_tok_s']:,.0f}", f"{v['fwd_bwd_tok_s']:,.0f}",
                f"{v['forward_tok_s'] / dense['forward_tok_s']:.2f}x",
                f"{v['fwd_bwd_tok_s'] / dense['fwd_bwd_tok_s']:.2f}x",
                f"{comp['forward']:.1f} + {comp['fwd_bwd']:.1f}" if comp else "",
            )
            label = f"T={c['T']} d={c['d']}" if name == DENSE else (
                f"d_ff={c['d_ff']} E={c['E']} k={c['k']}" if name == "moekit" else "")
        table.add_section()
    console.print(table)
    ceiling = Table(title="moekit / its experts-only ceiling (1.00 = routing and dispatch cost nothing)")
    for col in ("case", "fwd", "fwd+bwd", "compiled fwd", "compiled fwd+bwd"):
        ceiling.add_column(col, justify="left" if col == "case" else "right", no_wrap=True)
    for row in results:
        r = row["ratios"]
        cells = [r.get(k) for k in ("forward_vs_experts_only", "fwd_bwd_vs_experts_only",
                                    "compiled_forward_vs_experts_only", "compiled_fwd_bwd_vs_experts_only")]
        ceiling.add_row(row["case"]["name"], *("" if v is None else f"{v:.2f}x" for v in cells))
    console.print(ceiling)
    for row in results:
        console.print(f"{row['case']['name']}: " + ", ".join(f"{k}={v:.2f}x" for k, v in row["ratios"].items()))


def run_layer_bench(quick: bool = False, repeats: int | None = None, out: str | os.PathLike | None = None,
                    hf: bool = True, malloc_tuning: bool = True, console=None, device: str | torch.device = "cpu",
                    compiled: bool = True, cases: list[LayerCase] | None = None) -> dict:
    """Run the benchmark; print a table; write JSON to ``out`` if given. Returns the results.

    Forward is timed in eval mode under ``torch.no_grad()`` (inference); forward+backward in
    training mode with the routers' auxiliary losses on. Implementations are timed round-robin.
    ``compiled`` adds ``torch.compile`` rows; ``cases`` replaces the built-in shapes.
    """
    console = console or Console(width=max(Console().width, 132))
    device = torch.device(device)
    cases = cases or (QUICK_CASES if quick else CASES)
    repeats = repeats or (3 if quick else 7)
    tuned = keep_freed_memory() if malloc_tuning and device.type == "cpu" else False
    torch.manual_seed(0)
    results = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench layer", total=len(cases) * 2 * repeats)
        for case in cases:
            progress.update(task, description=f"{case.name}: building" + (" and compiling" if compiled else ""))
            fwd, fwd_bwd, compile_s = _timed(case, hf, device, compiled)
            progress.update(task, description=f"{case.name}: forward")
            t_f = interleaved_medians(fwd, repeats, progress=lambda: progress.advance(task))
            progress.update(task, description=f"{case.name}: forward+backward")
            t_fb = interleaved_medians(fwd_bwd, repeats, progress=lambda: progress.advance(task))
            results.append(_row(case, t_f, t_fb, compile_s, hf))
    _print_results(console, results, repeats, tuned, device)
    report = {
        "benchmark": "layer",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "repeats": repeats,
        "malloc_tuning": tuned,
        "compiled": compiled,
        "results": results,
    }
    if out is not None:
        atomic_write_text(Path(out), dumps(report, indent=2))
        console.print(f"wrote {out}")
    return report
