"""`moekit bench parallel`: expert parallelism over gloo, bytes exchanged and step time.

The demo's top-2 MoE GPT (8 experts per layer) trains on a global batch of ``batch x seq`` tokens:
in one process, and in ``world`` processes (data + expert parallel: each rank takes
``batch / world`` sequences and ``8 / world`` experts per layer; one thread each). Every rank
counts, per MoE layer and step of forward, the bytes its dispatcher exchanges (tokens out and
back): all of them, against ``2 x tokens x k x d_model x 4`` (what a dropless exchange without
padding moves), and the part that leaves the rank, against the ``(W - 1) / W`` share balanced
routing would send away. The backward exchanges the same volume again. The gradient all-reduce of
the replicated parameters is reported beside it. Step time: median over timed steps after warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from moekit.io import atomic_write_text, dumps
from moekit.layer import aux_loss
from moekit.models import GPT, GPTConfig
from moekit.parallel import exit_now, expert_parallel, is_expert_parallel, sync_gradients
from moekit.parallel.dispatch import AllToAllDispatcher

__all__ = ["run_parallel_bench"]


def _config(quick: bool):
    if quick:
        return GPTConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, max_seq_len=32, d_ff=128).with_moe(8, 2), 4
    return GPTConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, max_seq_len=128, d_ff=512).with_moe(8, 2), 16


def _steps(model, ids, steps: int, warmup: int, sync) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model.loss(ids[:, :-1], ids[:, 1:]) + aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(model)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, world: int, rendezvous: str, quick: bool, steps: int, warmup: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        cfg, batch = _config(quick)
        torch.manual_seed(0)
        model = expert_parallel(GPT(cfg))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), generator=g)
        mine = ids[rank * batch // world:(rank + 1) * batch // world]
        times = _steps(model, mine, steps, warmup, sync_gradients)
        dispatchers = [m.dispatcher for m in model.modules() if isinstance(getattr(m, "dispatcher", None), AllToAllDispatcher)]
        sent = [d.bytes_sent for d in dispatchers]
        off = [d.bytes_off_rank for d in dispatchers]
        allreduce = sum(p.numel() * p.element_size() for p in model.parameters() if not is_expert_parallel(p))
        result = {"rank": rank, "step_s": times, "bytes_sent_per_layer": sent, "bytes_off_rank_per_layer": off,
                  "allreduce_bytes": allreduce, "tokens": mine[:, :-1].numel()}
        found: list = [None] * world
        dist.all_gather_object(found, result)
        if rank == 0:
            Path(out).write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()
    exit_now()  # done: skip the interpreter's teardown, where gloo's threads can abort the process


def run_parallel_bench(out: str | os.PathLike | None = "runs/bench/parallel.json", world: int = 2, steps: int = 10,
                       warmup: int = 2, quick: bool = False, console=None) -> dict:
    console = console or (Console() if Console().is_terminal else Console(width=160))
    if quick:
        steps, warmup = 3, 1
    cfg, batch = _config(quick)
    if batch % world:
        raise ValueError(f"bench parallel: a global batch of {batch} sequences does not split over {world} ranks")
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), generator=g)
    single = _steps(model, ids, steps, warmup, lambda m: None)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ranks.json")
        # one pass counts the bytes of the timed steps and the warm-up: divide by all passes
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "rendezvous"), quick, steps, warmup, path), nprocs=world, join=True,
                           start_method="spawn")
        ranks = json.loads(Path(path).read_text())
    passes = steps + warmup
    k, d, el = 2, cfg.d_model, 4
    rows = []
    for r in ranks:
        bound = 2 * r["tokens"] * k * d * el  # out and back, per layer and forward
        per_layer = [b / passes for b in r["bytes_sent_per_layer"]]
        off = [b / passes for b in r["bytes_off_rank_per_layer"]]
        rows.append({"rank": r["rank"], "tokens": r["tokens"], "bytes_per_layer_step": per_layer,
                     "no_padding_bytes": bound, "ratio": max(per_layer) / bound,
                     "off_rank_per_layer_step": off, "off_rank_share": sum(off) / max(sum(per_layer), 1),
                     "allreduce_bytes_per_step": r["allreduce_bytes"], "step_s": statistics.median(r["step_s"])})
    par_step = max(r["step_s"] for r in rows)
    table = Table(title=f"moekit bench parallel: top-2 MoE GPT (d_model {d}, {cfg.n_layers} layers, 8 experts), global "
                        f"batch {batch} x {cfg.max_seq_len}, forward + backward + AdamW; gloo on loopback")
    for col in ("configuration", "tokens / rank", "a2a bytes / layer / forward", "2 x tokens x k x d x 4", "ratio",
                f"leaving the rank (balanced: {(world - 1) / world:.0%})", "grad all-reduce bytes / step",
                "median step s"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    table.add_row(f"1 process, {threads} threads", f"{ids[:, :-1].numel():,}", "0", "—", "—", "—", "—",
                  f"{statistics.median(single):.3f}")
    for r in rows:
        table.add_row(f"{world} processes, rank {r['rank']} (1 thread)", f"{r['tokens']:,}",
                      f"{max(r['bytes_per_layer_step']):,.0f}", f"{r['no_padding_bytes']:,}", f"{r['ratio']:.3f}",
                      f"{r['off_rank_share']:.0%}", f"{r['allreduce_bytes_per_step']:,}", f"{r['step_s']:.3f}")
    console.print(table)
    report = {"benchmark": "parallel", "torch": torch.__version__, "machine": platform.machine(), "world": world,
              "quick": quick, "config": cfg.to_dict(), "global_batch": [batch, cfg.max_seq_len], "steps": steps,
              "single_process_step_s": statistics.median(single), "single_process_threads": threads,
              "ranks": rows, "parallel_step_s": par_step, "speedup": statistics.median(single) / par_step}
    ratios = ", ".join(f"{r['ratio']:.3f}" for r in rows)
    console.print(f"step time {statistics.median(single):.3f} s in one process vs {par_step:.3f} s over {world} "
                  f"(x{report['speedup']:.2f}); a2a bytes / (2 x tokens x k x d x 4): {ratios}")
    if out is not None:
        atomic_write_text(Path(out), dumps(report, indent=2))
        console.print(f"wrote {out}")
    return report
