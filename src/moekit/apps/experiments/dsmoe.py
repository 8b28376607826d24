"""`moekit experiment dsmoe`: DSMoE's sigmoid gates with the straight-through estimator, against the
no-STE ablation and a top-k softmax router at equal mean active experts, in the demo's GPT.

As in the paper, a pre-trained dense model is cut into experts and trained on: the demo's dense
GPT is pre-trained once, every FFN is partitioned into 8 contiguous blocks (with every expert on
this is the dense model exactly), and each variant continues training for the same steps on the
same batches. DSMoE (tau 0.5, sparsity coefficient 1/L: the paper's average over layers) runs
first; the top-k softmax router (LLaMA-MoE style) then gets ``k = round(DSMoE's mean active
experts)`` and ``scale = k`` (its renormalised weights times k: with equal probabilities each chosen
block gets weight 1, its dense magnitude, as in the conversion experiments). The dense model trained
on for the same steps is the reference. Paper (Table 3, LLaMA-1B): training without the STE is far
worse, PPL 12.75 vs 7.41, with experts that never recover.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from rich.console import Console

from moekit.apps.experiments.lm import corpus, experts_per_token, settings
from moekit.apps.experiments.output import print_table, write_results
from moekit.apps.presets import base_config
from moekit.apps.report import markdown_table, pyplot, save_figure
from moekit.convert.partition import partition_gpt
from moekit.models import GPT
from moekit.train import TrainConfig, Trainer, evaluate

PAPER = {"DSMoE (STE)": 7.41, "no-STE ablation": 12.75, "top-k softmax": None, "dense (trained on)": None}
E = 8


def topk_baseline_args(k: int) -> dict:
    """The top-k baseline's router arguments: ``TopK(k, scale=k)``, renormalised for ``k > 1``, as the
    conversion experiments do. With the renormalised weights summing to 1, ``scale=k`` gives blocks cut
    from one dense FFN their dense magnitude back: with equal router probabilities every chosen block
    gets weight 1, so right after conversion the output is the dense FFN restricted to those blocks
    (without it, a third of that at k = 3). Top-1 keeps the raw probability (``renormalize=False``),
    which is what trains its router."""
    return {"k": k, "renormalize": k > 1, "scale": float(k)}


def _train(model, train, val, s, steps, lr, seed, eval_chunks, name):
    cfg = TrainConfig(steps=steps, batch_size=s.batch_size, seq_len=s.seq_len, lr=lr, seed=seed,
                      warmup_steps=max(1, steps // 20), log_every=5)
    trainer = Trainer(model, train, None, cfg, name=name)
    history = trainer.train()
    return history, evaluate(model, val, s.seq_len, 32, eval_chunks)


def run(out: str | os.PathLike = "runs/experiments/dsmoe", seeds: int = 2, quick: bool = False) -> dict:
    console = Console()
    t0 = time.perf_counter()
    s, _ = settings(quick)
    pre_steps, ft_steps, ft_lr = (30, 20, 3e-4) if quick else (300, 150, 3e-4)
    train, val, tok = corpus(quick, console)
    eval_chunks = 64 if quick else 256
    torch.manual_seed(0)
    dense = GPT(base_config(s, tok.get_vocab_size()))
    _, pre_ev = _train(dense, train, val, s, pre_steps, s.lr, 1000, eval_chunks, "pre-train dense")
    console.print(f"pre-trained dense: val ppl {pre_ev.ppl:.2f}")
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    sparsity = 1.0 / s.n_layers
    runs = []
    for seed in range(seeds):
        variants = [("DSMoE (STE)", "sigmoid_ste", {"sparsity": sparsity}),
                    ("no-STE ablation", "sigmoid_ste", {"sparsity": sparsity, "ste": False})]
        for name, router, args in variants + [("top-k softmax", "topk", None), ("dense (trained on)", None, None)]:
            torch.manual_seed(seed)
            dense.load_state_dict(state)
            if router == "topk":
                k = max(1, round(next(r["mean_active"] for r in runs if r["variant"] == "DSMoE (STE)" and r["seed"] == seed)))
                args = topk_baseline_args(k)
            model = dense if router is None else partition_gpt(dense, E, router, args)
            hist, ev = _train(model, train, val, s, ft_steps, ft_lr, seed, eval_chunks, f"{name} s{seed}")
            layers = experts_per_token(model, val, s) if router else []
            runs.append({"variant": name, "seed": seed, "val_ppl": ev.ppl, "layers": layers,
                         "k": (args or {}).get("k"), "router_args": args, "history": hist,
                         "mean_active": statistics.mean(ly["mean_experts"] for ly in layers) if layers else float(E),
                         "dead": sum(ly["dead_experts"] for ly in layers)})
    summary = summarize(runs)
    print_table(console, f"DSMoE vs no-STE vs top-k: dense pre-trained {pre_steps} steps (val ppl {pre_ev.ppl:.1f}), "
                f"then {ft_steps} steps each, {seeds} seeds, 8 experts of d_ff {s.d_ff // E}",
                ("variant", "val ppl", "active experts / token (of 8)", "dead experts (all layers)", "paper PPL (1B)"),
                [(row["variant"] + (f" (k={row['k']})" if row["k"] else ""),
                  f"{row['val_ppl']:.2f} ± {row['val_ppl_sd']:.2f}", f"{row['mean_active']:.2f}",
                  f"{row['dead_experts']:.1f}", "—" if row["paper_ppl"] is None else f"{row['paper_ppl']}")
                 for row in summary])
    result = {"experiment": "dsmoe", "seeds": seeds, "steps": ft_steps, "pretrain_steps": pre_steps,
              "pretrained_ppl": pre_ev.ppl, "finetune_lr": ft_lr, "summary": summary, "runs": runs,
              "wall_s": time.perf_counter() - t0}
    write_results(out, result, console, "dsmoe.png", lambda path: plot(runs, path))
    return result


def summarize(runs: list[dict]) -> list[dict]:
    """Per variant (in :data:`PAPER`'s order), the means over seeds."""
    summary = []
    for variant in PAPER:
        rs = [r for r in runs if r["variant"] == variant]
        summary.append({
            "variant": variant, "val_ppl": statistics.mean(r["val_ppl"] for r in rs),
            "val_ppl_sd": statistics.pstdev([r["val_ppl"] for r in rs]),
            "mean_active": statistics.mean(r["mean_active"] for r in rs),
            "dead_experts": statistics.mean(r["dead"] for r in rs), "paper_ppl": PAPER[variant], "k": rs[0]["k"],
        })
    return summary


def plot(runs: list[dict], path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    variants = [v for v in PAPER if v != "dense (trained on)"]
    for i, v in enumerate(variants):
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        hist = rs[0]["history"]
        axes[0].plot([h["step"] for h in hist if "loss" in h], [h["loss"] for h in hist if "loss" in h],
                     color=f"C{i}", label=v)
        layers = rs[0]["layers"]
        axes[1].plot(range(len(layers)), [statistics.mean(r["layers"][j]["mean_experts"] for r in rs)
                                          for j in range(len(layers))], "o-", color=f"C{i}", label=v)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_title("training loss (seed 0)", fontsize=9)
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("mean active experts per token")
    axes[1].set_title("active experts by depth (validation)", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def report_markdown(result: dict) -> str:
    rows = [[r["variant"] + (f" (k={r['k']})" if r["k"] else ""), f"{r['val_ppl']:.2f} ± {r['val_ppl_sd']:.2f}",
             f"{r['mean_active']:.2f}", f"{r['dead_experts']:.1f}",
             "—" if r["paper_ppl"] is None else str(r["paper_ppl"])] for r in result["summary"]]
    return "\n".join([
        f"The demo's dense GPT pre-trained {result['pretrain_steps']} steps (val ppl {result['pretrained_ppl']:.1f}), "
        f"cut into 8 experts of d_ff/8 per layer, then {result['steps']} more steps per variant, {result['seeds']} "
        "seeds. Paper (LLaMA-1B, Table 3): no-STE PPL 12.75 vs DSMoE 7.41.",
        "",
        markdown_table(["variant", "val ppl", "active experts / token", "dead experts", "paper PPL"], rows),
    ])
