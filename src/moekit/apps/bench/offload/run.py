"""`moekit bench offload` end to end: the model and its trace, the simulated policy grid, the
served runs, the Read-ME study; the tables printed, the result written as JSON beside its plot."""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from moekit.apps.bench.offload.fixtures import demo_moe, readme_model, resolve_model
from moekit.apps.bench.offload.plots import plot
from moekit.apps.bench.offload.serve import (
    HOST_RAM,
    LOW_THRESHOLDS,
    SERVED,
    decode_tok_s,
    memory_runs,
    mixed_precision_check,
    serve_check,
)
from moekit.apps.bench.offload.simulate import (
    BUDGETS,
    POLICIES,
    READ_ME_POLICIES,
    batching_study,
    check_policies,
    readme_study,
    simulate_grid,
)
from moekit.apps.bench.offload.tables import tables
from moekit.apps.bench.timing import peak_rss_mb
from moekit.io import atomic_write_text, dumps
from moekit.models import GPT
from moekit.offload import Trace, record_trace, write_store


def _served_runs(model: GPT, store, trace: Trace, ids: torch.Tensor, model_dir: str, store_dir: str,
                 serve_tokens: int, quality_sequences: int) -> dict:
    """The served configurations at 50% on the first sequence's ``serve_tokens`` tokens (after a
    warm-up run, so the first timed row pays no start-up), memory, mixed precision, in-memory speed."""
    seq = ids[:1, :serve_tokens]
    head = trace.head(serve_tokens)
    serve_check(model, store, seq, head, 0.5, *SERVED[0])
    served = [serve_check(model, store, seq, head, 0.5, *cfg) for cfg in SERVED]
    host_ram = [serve_check(model, store, seq, head, 0.5, label, "lru", "layer", math.inf, None, direct, "ram")
                for label, direct in HOST_RAM]
    memory = memory_runs(model_dir, store_dir, seq[0].tolist())
    qseqs = ids[:quality_sequences, :serve_tokens]
    mixed = [mixed_precision_check(model, store, qseqs, 0.5, tau) for tau in (None, *LOW_THRESHOLDS)]
    return {"served": served, "host_ram": host_ram, "mixed_precision": mixed, "memory": memory,
            "in_memory_decode_tok_s": decode_tok_s(model, seq)}


def _measure(model: GPT, trace: Trace, ids: torch.Tensor, model_dir: str, serve_tokens: int, quality_sequences: int,
             console: Console) -> dict:
    """Everything measured on a temporary on-disk store of ``model``'s experts (reads bypass the page cache)."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("MOEKIT_BENCH_DIR")) as tmp:
        store = write_store(model, Path(tmp) / "store", low_bit=True)
        store.drop_page_cache = True
        expert_bytes = [store.expert_bytes(i) for i in range(len(store.layers))]
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("simulating", total=len(BUDGETS) * len(POLICIES))
            rows = simulate_grid(trace, expert_bytes, progress=lambda: bar.advance(task))
        runs = _served_runs(model, store, trace, ids, model_dir, str(Path(tmp) / "store"), serve_tokens,
                            quality_sequences)
        trace.save(Path(tmp) / "trace.safetensors")
        return {"expert_bytes": expert_bytes, "all_experts_bytes": store.total_bytes(),
                "trace_bytes": (Path(tmp) / "trace.safetensors").stat().st_size, "simulated": rows, **runs}


def _print_tables(console: Console, report: dict) -> None:
    for title, header, body in tables(report):
        table = Table(title=title)
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in body:
            table.add_row(*map(str, row))
        console.print(table)


def run_offload_bench(out: str | os.PathLike | None = "runs/bench/offload.json", model_path: str | None = None,
                      sequences: int = 16, serve_tokens: int = 128, train_steps: int = 357, quality_sequences: int = 4,
                      readme: bool | None = None, quick: bool = False, console=None) -> dict:
    """Run the benchmark (``quick``: a small model, 4 sequences, 32 served tokens, no Read-ME study
    unless ``readme``), print its tables, write the result to ``out`` and its plot beside it
    (``out=None``: nothing written); returns the result."""
    check_policies((*POLICIES, *SERVED, *READ_ME_POLICIES))
    console = console or (Console() if Console().is_terminal else Console(width=200))
    t_start = time.perf_counter()
    if quick:
        sequences, serve_tokens, train_steps, quality_sequences = 4, 32, 20, 1
    model, val = demo_moe(model_path, train_steps, console, quick)
    where = resolve_model(model_path, quick)
    seq_len = model.config.max_seq_len
    ids, _, _ = val.chunks(seq_len, sequences)
    trace = record_trace(model, ids, meta={"model": str(where), "text": "demo validation split",
                                           "sequences": int(ids.shape[0]), "seq_len": seq_len})
    m = _measure(model, trace, ids, str(where), serve_tokens, quality_sequences, console)
    readme_res = readme_study(*readme_model(console=console)) if (readme if readme is not None else not quick) else None
    report = {"benchmark": "offload", "torch": torch.__version__, "machine": platform.machine(), "quick": quick,
              "model": str(where), "model_config": model.config.to_dict(), "tokens": trace.num_tokens,
              "sequences": int(ids.shape[0]), "num_experts": trace.num_experts, "expert_bytes": m["expert_bytes"],
              "all_experts_bytes": m["all_experts_bytes"], "trace_bytes": m["trace_bytes"], "budgets": list(BUDGETS),
              "simulated": m["simulated"], "served": m["served"], "host_ram": m["host_ram"],
              "mixed_precision": m["mixed_precision"], "batching": batching_study(trace), "readme": readme_res,
              "memory": m["memory"], "in_memory_decode_tok_s": m["in_memory_decode_tok_s"],
              "peak_rss_mb": peak_rss_mb(), "wall_s": time.perf_counter() - t_start}
    _print_tables(console, report)
    if out is not None:
        out = Path(out)
        atomic_write_text(out, dumps(report, indent=2))
        plot(m["simulated"], out.with_suffix(".png"))
        console.print(f"wrote {out} and {out.with_suffix('.png')}")
    return report
