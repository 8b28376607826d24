"""`moekit experiment mole-embeddings`: tied vs untied input/output embeddings, for the dense model
and MoLE at the demo's size, on the demo's batches.

MoLE's recipe unties the embeddings (papers.md §3.4, the 160M Megatron command); the demo ties them
for every variant, so that all arms share one convention and MoLE's routed experts read the same
matrix the output layer uses. This measures what the choice costs each arm, the same way for both:
same steps, batches and seeds, tied and untied.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from moekit.apps.experiments.lm import setup, train_lm
from moekit.apps.experiments.output import print_table
from moekit.io import atomic_write_text, dumps

ARMS = ("dense", "mole")


def _config(base, arm: str, tied: bool):
    cfg = replace(base, tie_embeddings=tied)
    if arm == "mole":  # the demo's MoLE variant: the dense FFN as shared expert + 4 lookup experts
        cfg = replace(cfg, ffn=[{"kind": "mole", "num_experts": 4, "d_ff": base.d_ff}] * base.n_layers)
    return cfg


def run(out: str | os.PathLike = "runs/experiments/mole-embeddings", seeds: int = 1, quick: bool = False) -> dict:
    console = Console()
    t0 = time.perf_counter()
    s, steps, train, val, base, eval_chunks = setup(quick, console)
    runs = []
    for seed in range(seeds):
        for arm in ARMS:
            for tied in (True, False):
                model, _, ev = train_lm(_config(base, arm, tied), train, val, s, steps, seed, eval_chunks,
                                        name=f"{arm} {'tied' if tied else 'untied'} s{seed}")
                runs.append({"arm": arm, "tied": tied, "seed": seed, "val_ppl": ev.ppl, "params": model.num_params(),
                             "active_params": model.active_params()})
    summary = []
    for arm in ARMS:
        for tied in (True, False):
            rs = [r for r in runs if r["arm"] == arm and r["tied"] == tied]
            summary.append({"arm": arm, "tied": tied, "val_ppl": statistics.mean(r["val_ppl"] for r in rs),
                            "params": rs[0]["params"], "active_params": rs[0]["active_params"]})
    result = {"experiment": "mole-embeddings", "seeds": seeds, "steps": steps, "quick": quick, "summary": summary,
              "runs": runs, "wall_s": time.perf_counter() - t0}
    out = Path(out)
    atomic_write_text(out / "results.json", dumps(result))
    print_table(console, f"tied vs untied embeddings ({steps} steps, {seeds} seed(s))",
                ("arm", "embeddings", "params", "val ppl"),
                [(r["arm"], "tied" if r["tied"] else "untied", f"{r['params'] / 1e6:.2f}M", f"{r['val_ppl']:.2f}")
                 for r in summary])
    return result


def report_markdown(result: dict) -> str:
    rows = ["| model | embeddings | params | val ppl |", "|---|---|---:|---:|"]
    for r in result["summary"]:
        rows.append(f"| {r['arm']} | {'tied' if r['tied'] else 'untied'} | {r['params'] / 1e6:.2f}M | "
                    f"{r['val_ppl']:.2f} |")
    return "\n".join(rows)
