"""`moekit experiment dynamic-k`: DA-MoE-style dynamic K against fixed top-2 at equal mean K, in the
demo's GPT, with K per token plotted against importance.

DA-MoE's method body is not public (papers.md §5): the importance signal and the K rule are our
design (see ``moekit.routers.DynamicK``). Paper claim (abstract): allocating experts by attention-
derived importance beats a fixed top-k at equal compute (on GLUE; here: language modelling).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from rich.console import Console

from moekit.apps.experiments.lm import experts_per_token, setup, train_lm, with_router
from moekit.apps.experiments.output import print_table, write_results
from moekit.apps.report import markdown_table, pyplot, save_figure
from moekit.layer import MoE

VARIANTS = {
    "top-2": ("topk", {"k": 2}),
    "DA-MoE dynamic K (1..4, mean 2)": ("dynamic_k", {"k_min": 1, "k_max": 4, "budget": 2.0}),
}


@torch.no_grad()
def k_vs_importance(model, val, s, chunks: int = 32) -> list[dict]:
    """Per MoE layer: (importance, K) of validation tokens, for the plot."""
    model.eval()
    x, _, _ = val.chunks(s.seq_len, chunks)
    model(x)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MoE) and m.last_routing.k_per_token is not None:
            out.append({"layer": name, "importance": m.last_routing.importance.tolist(),
                        "k": m.last_routing.k_per_token.tolist()})
    return out


def run(out: str | os.PathLike = "runs/experiments/dynamic-k", seeds: int = 2, quick: bool = False) -> dict:
    console = Console()
    t0 = time.perf_counter()
    s, steps, train, val, base, eval_chunks = setup(quick, console)
    runs, scatter = [], None
    for seed in range(seeds):
        for name, (router, args) in VARIANTS.items():
            model, hist, ev = train_lm(with_router(base, 8, s.d_ff // 2, router, args), train, val, s, steps, seed,
                                       eval_chunks, name=f"{name} s{seed}")
            layers = experts_per_token(model, val, s)
            runs.append({"variant": name, "seed": seed, "val_ppl": ev.ppl, "layers": layers,
                         "mean_k": statistics.mean(ly["mean_experts"] for ly in layers), "history": hist})
            if router == "dynamic_k" and seed == 0:
                scatter = k_vs_importance(model, val, s)
    summary = []
    for name in VARIANTS:
        rs = [r for r in runs if r["variant"] == name]
        summary.append({"variant": name, "val_ppl": statistics.mean(r["val_ppl"] for r in rs),
                        "val_ppl_sd": statistics.pstdev([r["val_ppl"] for r in rs]),
                        "mean_k": statistics.mean(r["mean_k"] for r in rs)})
    print_table(console, f"DA-MoE dynamic K vs top-2 ({steps} steps x {s.batch_size * s.seq_len} tokens, {seeds} seeds)",
                ("variant", "val ppl", "mean experts / token (validation)"),
                [(row["variant"], f"{row['val_ppl']:.2f} ± {row['val_ppl_sd']:.2f}", f"{row['mean_k']:.2f}")
                 for row in summary])
    result = {"experiment": "dynamic-k", "seeds": seeds, "steps": steps, "summary": summary, "runs": runs,
              "k_vs_importance": scatter, "wall_s": time.perf_counter() - t0}
    write_results(out, result, console, "dynamic_k.png", (lambda path: plot(scatter, path)) if scatter else None)
    return result


def plot(scatter: list[dict], path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(scatter), figsize=(3.2 * len(scatter), 3.2), squeeze=False)
    for ax, d in zip(axes[0], scatter):
        imp, k = torch.tensor(d["importance"]), torch.tensor(d["k"]).float()
        jitter = (torch.rand(len(k), generator=torch.Generator().manual_seed(0)) - 0.5) * 0.3
        ax.scatter(imp, k + jitter, s=2, alpha=0.3)
        ax.set_xscale("log")
        ax.set_title(d["layer"], fontsize=8)
        ax.set_xlabel("importance (self-attention x (t+1))", fontsize=7)
        ax.set_ylabel("experts K")
        ax.grid(alpha=0.3)
    fig.suptitle("DA-MoE: experts per token against importance (validation, seed 0)", fontsize=9, y=1.03)
    save_figure(fig, path)


def report_markdown(result: dict) -> str:
    rows = [[r["variant"], f"{r['val_ppl']:.2f} ± {r['val_ppl_sd']:.2f}", f"{r['mean_k']:.2f}"]
            for r in result["summary"]]
    return "\n".join([
        f"The demo's GPT with 8 experts of d_ff/2, {result['steps']} steps, {result['seeds']} seeds. The importance "
        "signal and the K rule are our design (the paper's method body is not public); its claim: dynamic K beats "
        "fixed top-k at equal compute.",
        "",
        markdown_table(["variant", "val ppl", "experts / token"], rows),
    ])
