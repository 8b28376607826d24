"""`moekit bench offload`: expert-cache policies on real routing traces, and the served runtime.

1. The model: the demo's top-2 MoE (``runs/demo/variants/moe-top2/model`` after ``make demo``), or
   else one trained with the demo's settings and token count (357 steps of 16 x 128) and kept in
   ``runs/bench/moe-top2``.
2. The trace: its routing on held-out validation text (whole sequences, token by token: the access
   stream of batch-1 decoding), recorded with :func:`moekit.offload.record_trace`.
3. Policies x budgets (25/50/75% of all experts' bytes) in the simulator: hits, loads and bytes per
   token are exact counters, so they do not depend on this machine; every policy against Belady-MIN.
4. The runtime: the model served from an on-disk store through the cache (reads bypass the page
   cache), decoding held-out tokens: its counters must equal the simulator's on the same stream,
   its logits the in-memory model's; tokens/s and the time spent loading are measured.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from moekit.apps.bench.timing import peak_rss_mb, rss_mb
from moekit.models import GPT
from moekit.offload import Future, Trace, compare_batching, load_offloaded, offload, record_trace, simulate, write_store
from moekit.offload.runtime import STREAM_BYTES

DEFAULT_MODEL = "runs/demo/variants/moe-top2/model"  # written by `make demo`
READ_ME_MODEL = "runs/bench/readme-topics"  # the demo's dense GPT refactored by Read-ME, one expert per topic
TRAINED_HERE = "runs/bench/moe-top2"  # where the bench trains one with the demo's settings otherwise
BUDGETS = (0.25, 0.5, 0.75)
#: (label, policy, partition, lookahead window in tokens, direct rule)
POLICIES = (
    ("LRU, one global pool", "lru", "global", math.inf, None),
    ("LRU, per layer", "lru", "layer", math.inf, None),
    ("LFU, per layer", "lfu", "layer", math.inf, None),
    ("LRU + Fiddler's rule (compute misses from the store)", "lru", "layer", math.inf, 2),
    ("Belady, lookahead = this token (PreGate decode)", "belady", "layer", 1, None),
    ("Belady, lookahead 16 tokens", "belady", "layer", 16, None),
    ("Belady, lookahead 16 tokens + bypass to the store", "belady", "layer", 16, "future"),
    ("Belady-MIN, per layer (offline optimum)", "belady", "layer", math.inf, None),
    ("Belady-MIN + bypass to the store", "belady", "layer", math.inf, "future"),
    ("Belady-MIN, one global pool", "belady", "global", math.inf, None),
)
MIN_LABEL = "Belady-MIN, per layer (offline optimum)"
#: Read-ME Table 4 (batched inference, 8 experts): capacity -> (LRU, Belady) hit rate
READ_ME_TABLE_4_ALL = {2: (0.3390, 0.4416), 3: (0.5242, 0.6182), 4: (0.6695, 0.7721), 5: (0.8348, 0.8803)}


def resolve_model(path: str | os.PathLike | None, quick: bool = False) -> Path:
    """``path``, else the demo's trained moe-top2, else where the bench trains one."""
    if path is not None:
        return Path(path)
    if quick:
        return Path(TRAINED_HERE + "-quick")
    return Path(DEFAULT_MODEL if (Path(DEFAULT_MODEL) / "config.json").exists() else TRAINED_HERE)


def demo_moe(path: str | os.PathLike | None = None, steps: int = 357, console=None, quick: bool = False
             ) -> tuple[GPT, object]:
    """``(model, validation stream)``: the trained top-2 MoE at ``path`` (default: the demo's, else
    ``runs/bench/moe-top2``), trained with the demo's settings for ``steps`` steps and saved there
    if it is missing (``quick``: the quick demo's smaller settings)."""
    from dataclasses import replace

    from moekit.apps.presets import FULL, QUICK, base_config, default_variants, prepare_corpus
    from moekit.train import TrainConfig, Trainer

    path = resolve_model(path, quick)
    s = QUICK if quick else FULL
    train, val, tok = prepare_corpus(s, console=console)
    if (path / "config.json").exists():
        model = GPT.load(path).eval()
        if model.config.vocab_size != tok.get_vocab_size():
            raise ValueError(f"{path}: vocabulary of {model.config.vocab_size} tokens, the {'quick ' if quick else ''}"
                             f"demo's tokenizer has {tok.get_vocab_size()}; pass --model of a model trained by "
                             f"`moekit demo{' --quick' if quick else ''}`")
        return model, val
    if console is not None:
        console.print(f"{path}: no trained model; training the demo's moe-top2 for {steps} steps (demo settings)")
    variant = next(v for v in default_variants(base_config(s, tok.get_vocab_size())) if v.name == "moe-top2")
    torch.manual_seed(0)
    model = GPT(variant.config)
    cfg = TrainConfig(steps=steps, batch_size=s.batch_size, seq_len=s.seq_len, lr=s.lr,
                      warmup_steps=max(1, steps // 20), log_every=25)
    Trainer(model, train, None, replace(cfg), progress=console is not None, name="moe-top2").train()
    model.save(path, files={"tokenizer.json": tok.to_str()})  # the tokenizer for moekit generate
    return model.eval(), val


def readme_model(path: str | os.PathLike = READ_ME_MODEL, steps: int = 357, topics: int = 8, console=None
                 ) -> tuple[GPT, object]:
    """``(model, validation stream)``: the demo's dense GPT (its settings, ``steps`` steps) refactored
    by Read-ME into one expert per topic of the corpus's ``topics`` largest (a residual expert always
    on, a PreGate routing every layer), tuned in two alternating rounds; built and saved at ``path``
    if missing."""
    from collections import Counter
    from dataclasses import replace

    from moekit.apps.presets import FULL, base_config, prepare_corpus
    from moekit.convert import refactor, tune
    from moekit.train import TrainConfig, Trainer

    path = Path(path)
    train, val, tok = prepare_corpus(FULL, console=console)
    if (path / "config.json").exists():
        return GPT.load(path).eval(), val
    if console is not None:
        console.print(f"{path}: building the Read-ME model (dense GPT, {steps} steps; refactor by topic; tuning)")
    torch.manual_seed(0)
    dense = GPT(base_config(FULL, tok.get_vocab_size()))
    cfg = TrainConfig(steps=steps, batch_size=FULL.batch_size, seq_len=FULL.seq_len, lr=FULL.lr,
                      warmup_steps=max(1, steps // 20), log_every=25)
    Trainer(dense, train, None, replace(cfg), progress=console is not None, name="dense").train()
    names = [t for t, _ in Counter(d.topic_en for d in train.docs).most_common() if t != "Uncategorized"][:topics]
    doc_topic = [d.topic_en for d in train.docs]
    domains = {}
    for t in names:
        keep = torch.tensor([x == t for x in doc_topic])[train.doc.long()]
        ids = train.ids[keep]
        n = min(32, ids.numel() // FULL.seq_len)
        domains[t] = ids[: n * FULL.seq_len].view(n, FULL.seq_len)
    model = refactor(dense, domains, keep=0.5, pregate={"d_model": 64, "n_heads": 4}, progress=console is not None)
    tune(model, lambda step: train.batch(step, FULL.batch_size, FULL.seq_len, 7), rounds=2, router_steps=30,
         expert_steps=60, router_lr=5e-3, expert_lr=3e-4, progress=console is not None)
    model.save(path, files={"tokenizer.json": tok.to_str()})
    return model.eval(), val


def readme_study(model: GPT, val, sequences: int = 32) -> dict:
    """The Read-ME serving claims on a Read-ME model: hit rate of each policy at 2..5 expert slots
    per layer (Table 4), temporal locality, and expert-aware batching of pre-gated requests."""
    seq_len = model.config.max_seq_len
    ids, _, _ = val.chunks(seq_len, sequences)
    trace = record_trace(model, ids, meta={"model": READ_ME_MODEL, "seq_len": seq_len})
    E, L = trace.num_experts[0], trace.num_layers
    acc, tokens = trace.accesses(), trace.token.tolist()
    ebytes = [1] * L
    table = []
    for cap in range(1, E):
        row = {"capacity": cap}
        for label, policy, window in (("LRU", "lru", math.inf), ("LFU", "lfu", math.inf),
                                      ("Belady, lookahead 16 tokens", "belady", 16),
                                      ("Belady-MIN", "belady", math.inf)):
            row[label] = simulate(acc, ebytes, trace.num_experts, cap * L, policy, "layer", window, tokens).hit_rate
        table.append(row)
    per_token = trace.per_token()
    first = [t[0][0] for t in per_token]
    same = sum(a == b for i, (a, b) in enumerate(zip(first, first[1:])) if (i + 1) % seq_len)
    requests = [per_token[i * seq_len:(i + 1) * seq_len] for i in range(trace.num_tokens // seq_len)]
    return {"num_experts": E, "layers": L, "tokens": trace.num_tokens, "requests": len(requests), "hit_rates": table,
            "temporal_locality": same / (trace.num_tokens - len(requests)),
            "expert_share": [first.count(e) / len(first) for e in range(E)],
            "batching": {str(b): compare_batching(requests, b) for b in (8, 16)}}


def simulate_grid(trace: Trace, expert_bytes: list[int], budgets=BUDGETS, policies=POLICIES, progress=None) -> list[dict]:
    """Every policy at every budget on one trace; ``vs_min`` = loads / Belady-MIN's (per layer)."""
    acc, tokens = trace.accesses(), trace.token.tolist()
    total = sum(b * n for b, n in zip(expert_bytes, trace.num_experts))
    rows = []
    for budget in budgets:
        found = {}
        for label, policy, partition, window, direct in policies:
            s = simulate(acc, expert_bytes, trace.num_experts, int(budget * total), policy, partition, window, tokens,
                         direct=direct)
            found[label] = s
            if progress is not None:
                progress()
        best = found[MIN_LABEL].misses
        for (label, policy, partition, window, direct), s in zip(policies, found.values()):
            rows.append({"budget": budget, "policy": label, "kind": policy, "partition": partition,
                         "window": None if math.isinf(window) else window, "direct_rule": direct, "hit_rate": s.hit_rate,
                         "direct_share": s.direct / max(s.misses, 1),
                         "loads_per_token": s.misses / trace.num_tokens, "bytes_per_token": s.bytes_loaded / trace.num_tokens,
                         "vs_min": s.misses / best if best else math.nan,
                         "hit_rate_by_layer": [s.hits_by_layer.get(i, 0) / max(s.accesses_by_layer.get(i, 0), 1)
                                               for i in range(trace.num_layers)]})
    return rows


#: served configurations at 50%: (label, policy, partition, window, prefetch, direct rule)
SERVED = (
    ("LRU, per layer", "lru", "layer", math.inf, None, None),
    ("LRU, per layer + next-layer-gate prefetch", "lru", "layer", math.inf, "gate", None),
    ("LRU + Fiddler's rule (compute misses from the store)", "lru", "layer", math.inf, None, 2),
    ("Belady, lookahead = this token (PreGate decode)", "belady", "layer", 1, None, None),
    ("Belady, lookahead = this token + exact prefetch", "belady", "layer", 1, "future", None),
    ("Belady, lookahead 16 tokens", "belady", "layer", 16, None, None),
    ("Belady, lookahead 16 tokens + bypass to the store", "belady", "layer", 16, None, "future"),
    ("Belady-MIN + exact prefetch", "belady", "layer", math.inf, "future", None),
)


@torch.no_grad()
def serve_check(model: GPT, store, seq: torch.Tensor, trace: Trace, budget: float, label: str, policy: str,
                partition: str, window: float, prefetch: str | None = None, direct: str | int | None = None,
                host: str = "disk") -> dict:
    """Decode ``seq`` token by token with the experts served from ``store``; counters against the
    simulator on the same stream (but for the predicted prefetch), logits against the in-memory model."""
    served = copy.deepcopy(model)
    acc, tokens = trace.accesses(), trace.token.tolist()
    future = Future(acc, tokens) if policy == "belady" or prefetch == "future" or direct == "future" else None
    server = offload(served, store, budget=budget, policy=policy, partition=partition, window=window, future=future,
                     prefetch=prefetch, direct=direct, host=host)
    caches = [{} for _ in served.blocks]
    t0 = time.perf_counter()
    logits = torch.cat([served(seq[:, t: t + 1], caches) for t in range(seq.shape[1])], 1)
    secs = time.perf_counter() - t0
    st = server.stats()
    server.close()
    row = {"budget": budget, "policy": label, "prefetch": prefetch, "direct_rule": direct, "host": host,
           "costs": server.costs, "tokens": st.tokens,
           "tok_s": st.tokens / secs,
           **{k: v for k, v in st.as_dict().items() if k != "tokens"},
           "exposed_share": st.exposed_s / secs, "max_abs_logit_diff": float((logits - model(seq)).abs().max())}
    if prefetch != "gate":
        sim = simulate(acc, server.expert_bytes, trace.num_experts, server.budget_bytes, policy, partition, window,
                       tokens, prefetch=prefetch == "future", direct=server.cache.direct)
        row["matches_simulator"] = (st.hits, st.misses, st.prefetched, st.direct, st.bytes_loaded) == (
            sim.hits, sim.misses, sim.prefetched, sim.direct, sim.bytes_loaded)
    return row


#: every expert held in host RAM, the cache a second copy in the same memory: (label, direct rule)
HOST_RAM = (("LRU, load on miss", None), ("LRU + Fiddler's rule, threshold measured at start-up", "cost"))

BATCH_SIZES = (4, 8)
LOW_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)  # top-2 weights are renormalised: < 0.5 is the second expert of every token


@torch.no_grad()
def mixed_precision_check(model: GPT, store, seqs: torch.Tensor, budget: float, threshold: float | None) -> dict:
    """HOBBIT at ``budget`` (LRU per layer): decode ``seqs`` with misses below ``threshold`` served by
    int8 copies; next-token perplexity against the in-memory model's on the same tokens."""
    import torch.nn.functional as F

    served = copy.deepcopy(model)
    server = offload(served, store, budget=budget, policy="lru", low_threshold=threshold)
    nll = ref_nll = 0.0
    worst = 0.0
    for seq in seqs:
        seq = seq.unsqueeze(0)
        caches = [{} for _ in served.blocks]
        logits = torch.cat([served(seq[:, t: t + 1], caches) for t in range(seq.shape[1])], 1)
        want = model(seq)
        nll += float(F.cross_entropy(logits[0, :-1], seq[0, 1:], reduction="sum"))
        ref_nll += float(F.cross_entropy(want[0, :-1], seq[0, 1:], reduction="sum"))
        worst = max(worst, float((logits - want).abs().max()))
    n = seqs.shape[0] * (seqs.shape[1] - 1)
    st = server.stats()
    server.close()
    return {"budget": budget, "low_threshold": threshold, "tokens": st.tokens, "ppl": math.exp(nll / n),
            "ppl_in_memory": math.exp(ref_nll / n), "max_abs_logit_diff": worst,
            "low_bit_share": st.low_bit / st.accesses, "bytes_per_token": st.bytes_per_token, "hit_rate": st.hit_rate}


def _memory_run(model_dir: str, store: str | None, budget: float | None, ids: list[int]) -> dict:
    """Peak RSS of decoding ``ids`` (teacher-forced) alone in this process: the model in memory
    (``budget=None``) or served through a cache of ``budget``, its experts never loaded."""
    start = rss_mb()
    with torch.no_grad():
        if budget is None:
            model, server = GPT.load(model_dir).eval(), None
        else:
            model, server = load_offloaded(model_dir, store, budget)
        seq = torch.tensor([ids])
        caches = [{} for _ in model.blocks]
        for t in range(seq.shape[1]):
            model(seq[:, t: t + 1], caches)
    peak = peak_rss_mb()
    out = {"budget": budget, "peak_rss_mb": peak, "rss_at_start_mb": start, "model_rss_mb": peak - start}
    if server is not None:
        out["resident_expert_bytes"] = server.resident_bytes()
        server.close()
    return out


def memory_runs(model_dir: str, store: str, ids: list[int], budgets=BUDGETS) -> list[dict]:
    """One spawned process per configuration, so each peak RSS is that configuration's alone."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = []
    for budget in (None, *budgets):
        with ctx.Pool(1) as pool:
            out.append(pool.apply(_memory_run, (model_dir, store, budget, ids)))
    return out


def hidden_vs_demand(served: list[dict]) -> list[float | None]:
    """For each served row with prefetch: the share of its reads' cost that the forward did not wait
    for, against what the same bytes cost as demand reads in the run without prefetch (the first
    row): ``1 - exposed / (bytes x demand seconds per byte)``. Unlike the reader thread's own time,
    this charges prefetching for the reads it slows down."""
    base = next(x for x in served if not x["prefetch"])
    per_byte = base["read_s"] / max(base["bytes_loaded"], 1)
    return [None if not x["prefetch"] else 1 - x["exposed_s"] / max(x["bytes_loaded"] * per_byte, 1e-12) for x in served]


def plot(rows: list[dict], path) -> None:
    from moekit.apps.report import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    for label, *_ in POLICIES:
        rs = [r for r in rows if r["policy"] == label]
        style = ":" if "bypass" in label or "Fiddler" in label else "--" if "MIN" in label else "-"
        x = [100 * r["budget"] for r in rs]
        axes[0].plot(x, [100 * r["hit_rate"] for r in rs], style, marker="o", label=label)
        axes[1].plot(x, [r["bytes_per_token"] / 2**20 for r in rs], style, marker="o")
    axes[0].set_ylabel("hit rate (%)")
    axes[1].set_ylabel("MiB read per token")
    for ax in axes:
        ax.set_xlabel("cache budget (% of all experts' bytes)")
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=2, fontsize=7.5, frameon=False)
    fig.suptitle("expert cache policies on the routing of the demo's top-2 MoE (held-out text, batch-1 decode)",
                 fontsize=9)
    fig.subplots_adjust(bottom=0.3, wspace=0.25)
    _save(fig, path)


def run_offload_bench(out: str | os.PathLike | None = "runs/bench/offload.json", model_path: str | None = None,
                      sequences: int = 16, serve_tokens: int = 128, train_steps: int = 357, quality_sequences: int = 4,
                      readme: bool | None = None, quick: bool = False, console=None) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

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
    with tempfile.TemporaryDirectory(dir=os.environ.get("MOEKIT_BENCH_DIR")) as tmp:
        store = write_store(model, Path(tmp) / "store", low_bit=True)
        store.drop_page_cache = True
        expert_bytes = [store.expert_bytes(i) for i in range(len(store.layers))]
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("simulating", total=len(BUDGETS) * len(POLICIES))
            rows = simulate_grid(trace, expert_bytes, progress=lambda: bar.advance(task))
        seq = ids[:1, :serve_tokens]
        head = trace.head(serve_tokens)
        serve_check(model, store, seq, head, 0.5, *SERVED[0])  # warm-up: the first timed row pays no start-up
        serve = [serve_check(model, store, seq, head, 0.5, *cfg) for cfg in SERVED]
        host_ram = [serve_check(model, store, seq, head, 0.5, label, "lru", "layer", math.inf, None, direct, "ram")
                    for label, direct in HOST_RAM]
        memory = memory_runs(str(where), str(Path(tmp) / "store"), seq[0].tolist())
        qseqs = ids[:quality_sequences, :serve_tokens]
        mixed = [mixed_precision_check(model, store, qseqs, 0.5, tau) for tau in (None, *LOW_THRESHOLDS)]
        t0 = time.perf_counter()
        with torch.no_grad():
            caches = [{} for _ in model.blocks]
            for t in range(seq.shape[1]):
                model(seq[:, t: t + 1], caches)
        in_memory_tok_s = seq.shape[1] / (time.perf_counter() - t0)
        trace.save(Path(tmp) / "trace.safetensors")
        trace_bytes = (Path(tmp) / "trace.safetensors").stat().st_size
        total_bytes = store.total_bytes()

    per_token = trace.per_token()
    S = trace.meta["seq_len"]
    requests = [per_token[i * S:(i + 1) * S] for i in range(trace.num_tokens // S)]
    batching = {b: compare_batching(requests, b) for b in BATCH_SIZES}
    readme_res = None
    if readme if readme is not None else not quick:
        rm_model, rm_val = readme_model(console=console)
        readme_res = readme_study(rm_model, rm_val)
    report = {"benchmark": "offload", "torch": torch.__version__, "machine": platform.machine(), "quick": quick,
              "model": str(where), "model_config": model.config.to_dict(), "tokens": trace.num_tokens,
              "sequences": int(ids.shape[0]), "num_experts": trace.num_experts, "expert_bytes": expert_bytes,
              "all_experts_bytes": total_bytes, "trace_bytes": trace_bytes, "budgets": list(BUDGETS),
              "simulated": rows, "served": serve, "host_ram": host_ram, "mixed_precision": mixed,
              "batching": {str(b): v for b, v in batching.items()}, "readme": readme_res, "memory": memory,
              "in_memory_decode_tok_s": in_memory_tok_s,
              "peak_rss_mb": peak_rss_mb(),
              "wall_s": time.perf_counter() - t_start}
    for title, header, body in tables(report):
        table = Table(title=title)
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in body:
            table.add_row(*map(str, row))
        console.print(table)
    if out is not None:
        from moekit.io import atomic_write_text, dumps

        out = Path(out)
        atomic_write_text(out, dumps(report, indent=2))
        plot(rows, out.with_suffix(".png"))
        console.print(f"wrote {out} and {out.with_suffix('.png')}")
    return report




def tables(r: dict) -> list[tuple[str, list[str], list[list]]]:
    """``(title, header, rows)`` of every table of a result: printed by the bench, written to the report."""
    budgets = r["budgets"]
    sim = {(x["policy"], x["budget"]): x for x in r["simulated"]}
    labels = list(dict.fromkeys(x["policy"] for x in r["simulated"]))
    out = [(f"cache policies: {r['tokens']:,} held-out tokens, {len(r['num_experts'])} MoE layers x "
            f"{r['num_experts'][0]} experts of {r['expert_bytes'][0] / 2**10:.0f} KiB, batch-1 decode",
            ["policy", *[f"{b:.0%}: hit rate / KiB per token / vs MIN" for b in budgets]],
            [[lab, *[f"{sim[lab, b]['hit_rate']:.1%} / {sim[lab, b]['bytes_per_token'] / 2**10:,.0f} / "
                     f"{sim[lab, b]['vs_min']:.2f}x" for b in budgets]] for lab in labels])]
    served = r["served"]
    out.append((f"served from disk (page cache bypassed), budget 50%, {served[0]['tokens']} tokens at batch 1; in "
                f"memory: {r['in_memory_decode_tok_s']:,.0f} tok/s",
                ["configuration", "tok/s", "hit rate", "KiB read / token", "misses from store", "ms / read",
                 "read ms / token", "exposed ms / token", "read cost hidden", "prefetch precision / recall",
                 "= simulator", "max abs logit diff"],
                [[x["policy"], f"{x['tok_s']:,.0f}", f"{x['hit_rate']:.1%}", f"{x['bytes_per_token'] / 2**10:,.0f}",
                  f"{x.get('direct', 0) / max(x['misses'], 1):.0%}",
                  f"{1e3 * x['read_s'] / max(x['misses'] + x['prefetched'] - x.get('low_bit', 0), 1):.2f}",
                  f"{1e3 * x['read_s'] / x['tokens']:.2f}", f"{1e3 * x['exposed_s'] / x['tokens']:.2f}",
                  "—" if h is None else f"{h:.0%}",
                  "—" if not x["prefetch"] else f"{x['prefetch_precision']:.2f} / {x['prefetch_recall']:.2f}",
                  {True: "yes", False: "NO"}.get(x.get("matches_simulator"), "n/a"), f"{x['max_abs_logit_diff']:.1e}"]
                 for x, h in zip(served, hidden_vs_demand(served))]))
    if r.get("host_ram"):
        ram = r["host_ram"]
        out.append(("experts held in host RAM, the cache a second copy in the same memory: budget 50%, "
                    f"{ram[0]['tokens']} tokens at batch 1",
                    ["configuration", "tok/s", "hit rate", "misses computed where stored", "KiB copied / token",
                     "= simulator", "max abs logit diff"],
                    [[x["policy"], f"{x['tok_s']:,.0f}", f"{x['hit_rate']:.1%}", f"{x['direct'] / max(x['misses'], 1):.0%}",
                      f"{(x['bytes_loaded'] - x['direct'] * r['expert_bytes'][0]) / x['tokens'] / 2**10:,.0f}",
                      {True: "yes", False: "NO"}.get(x.get("matches_simulator"), "n/a"), f"{x['max_abs_logit_diff']:.1e}"]
                     for x in ram]))
        cal = next((x["costs"] for x in ram if x.get("costs")), None)
        if cal:
            c = cal["layers"][0]
            out.append((f"measured costs of one expert (layer 0, device {cal['device']}, experts in {cal['host']}), "
                        f"medians: load {1e3 * c['t_load']:.3f} ms; compute from the host copy while fewer than "
                        f"{c['threshold']} tokens need it",
                        ["tokens", "load + compute in the cache, ms", "compute where stored, ms"],
                        [[n, f"{1e3 * (c['t_load'] + tc):.3f}", f"{1e3 * th:.3f}"]
                         for n, tc, th in zip(c["tokens"], c["t_cache"], c["t_host"])]))
    if r.get("memory"):
        out.append(("peak RSS, each configuration alone in a fresh process decoding the same tokens",
                    ["configuration", "expert MiB in RAM", "peak RSS MB", "growth after start MB"],
                    [["in memory" if m["budget"] is None else f"served, budget {m['budget']:.0%}",
                      f"{(m.get('resident_expert_bytes') or r['all_experts_bytes']) / 2**20:.1f}",
                      f"{m['peak_rss_mb']:.0f}", f"{m['model_rss_mb']:.0f}"] for m in r["memory"]]))
    out.append((f"mixed precision (HOBBIT): misses with a gate weight below the threshold read the int8 copy; budget "
                f"50%, LRU per layer, {r['mixed_precision'][0]['tokens']} tokens",
                ["int8 when weight <", "accesses served int8", "hit rate", "KiB read / token", "ppl", "ppl in memory",
                 "max abs logit diff"],
                [["never" if x["low_threshold"] is None else f"{x['low_threshold']:g}", f"{x['low_bit_share']:.1%}",
                  f"{x['hit_rate']:.1%}", f"{x['bytes_per_token'] / 2**10:,.0f}", f"{x['ppl']:.3f}",
                  f"{x['ppl_in_memory']:.3f}", f"{x['max_abs_logit_diff']:.1e}"] for x in r["mixed_precision"]]))
    out.append(("expert-aware batching (Read-ME Algorithm 1, queues keyed by the layer-0 top-1 expert): unique "
                "experts per batch and layer",
                ["batch size", "first come, first served", "expert-aware"],
                [[b, f"{v['fcfs']['unique_experts']:.2f}", f"{v['expert_aware']['unique_experts']:.2f}"]
                 for b, v in r.get("batching", {}).items()]))
    rm = r.get("readme")
    if rm:
        cols = [k for k in rm["hit_rates"][0] if k != "capacity"]
        rows = []
        for row in rm["hit_rates"]:
            paper = READ_ME_TABLE_4_ALL.get(row["capacity"])
            rows.append([row["capacity"], *[f"{row[c]:.1%}" for c in cols],
                         "—" if paper is None else f"{paper[0]:.1%} / {paper[1]:.1%}"])
        out.append((f"Read-ME model ({rm['num_experts']} experts per layer, PreGate): hit rate by expert slots per "
                    f"layer, {rm['tokens']:,} held-out tokens", ["slots", *cols, "Read-ME Table 4: LRU / Belady"], rows))
    return out


def _direct_lines(r: dict, sim: dict) -> list[str]:
    """What computing misses straight from the store (not admitting them) did, in numbers."""
    served = {x["policy"]: x for x in r["served"]}
    names = ("LRU, per layer", "LRU + Fiddler's rule (compute misses from the store)", "Belady, lookahead 16 tokens",
             "Belady, lookahead 16 tokens + bypass to the store")
    if not all((n, 0.5) in sim for n in (*names, MIN_LABEL, "Belady-MIN + bypass to the store")) or not all(
            n in served for n in names):
        return []
    lru, fid, look, lookb = (sim[n, 0.5] for n in names)
    mn, mnb = sim[MIN_LABEL, 0.5], sim["Belady-MIN + bypass to the store", 0.5]
    s_lru, s_fid, s_look, s_lookb = (served[n] for n in names)

    def per_read(x: dict) -> float:
        return 1e3 * x["read_s"] / max(x["misses"] + x["prefetched"], 1)

    cut = {b: 1 - sim["Belady-MIN + bypass to the store", b]["loads_per_token"] / sim[MIN_LABEL, b]["loads_per_token"]
           for b in r["budgets"] if (MIN_LABEL, b) in sim}
    return [
        f"A miss need not be admitted: it can be computed straight from the store, streamed through a "
        f"{STREAM_BYTES >> 10} KiB buffer, "
        "evicting nothing. Fiddler decides this by cost: computing on the CPU, where the weights are, beats moving "
        "them to the GPU when few tokens need the expert. This machine has no second device: the cache and the "
        f"store's reader share the same DRAM and cores, so a miss computed from the store reads the same bytes as a "
        f"load ({per_read(s_lookb):.2f} vs {per_read(s_look):.2f} ms per read in the served runs above) and the "
        "choice only changes what the cache keeps.",
        "",
        f"- Fiddler's rule at batch 1 (every miss has one token) stops admitting once the cache is full, so the cache "
        f"keeps the experts it filled with first: over the {r['tokens']:,}-token trace {fid['hit_rate']:.1%} hits "
        f"against LRU's {lru['hit_rate']:.1%} at 50%, {fid['bytes_per_token'] / lru['bytes_per_token']:.2f}x the "
        f"bytes (the short served run: {s_fid['hit_rate']:.1%} vs {s_lru['hit_rate']:.1%} hits, {s_fid['tok_s']:,.0f} "
        f"vs {s_lru['tok_s']:,.0f} tok/s, {per_read(s_fid):.2f} vs {per_read(s_lru):.2f} ms per read). Without a "
        "faster place to compute, load-on-miss wins.",
        f"- Belady's rule with bypass (compute from the store when the known future needs the missed expert after "
        f"every expert it could evict; with the whole future it never reads more than Belady-MIN, tested): Belady-MIN + bypass "
        f"reads {mnb['loads_per_token']:.2f} experts per token against Belady-MIN's {mn['loads_per_token']:.2f} "
        f"(fewer reads: " + ", ".join(f"{v:.0%} at {b:.0%}" for b, v in cut.items()) + "); with 16 tokens of lookahead "
        f"{lookb['hit_rate']:.1%} vs {look['hit_rate']:.1%} hits, served {s_lookb['tok_s']:,.0f} vs "
        f"{s_look['tok_s']:,.0f} tok/s with {s_lookb['bytes_per_token'] / 2**10:,.0f} vs "
        f"{s_look['bytes_per_token'] / 2**10:,.0f} KiB read per token.",
        "",
    ]


def report_markdown(r: dict) -> str:
    """The benchmark's tables and what they show, for the demo's report."""
    from moekit.apps.report import markdown_table

    table = iter([markdown_table(header, rows) for _, header, rows in tables(r)])
    sim = {(x["policy"], x["budget"]): x for x in r["simulated"]}
    lru, mn = sim["LRU, per layer", 0.5], sim["Belady-MIN, per layer (offline optimum)", 0.5]
    look = sim["Belady, lookahead 16 tokens", 0.5]
    hidden = hidden_vs_demand(r["served"])
    exact = next((h for x, h in zip(r["served"], hidden) if x["policy"].startswith("Belady, lookahead = this token +")),
                 None)
    cap = READ_ME_TABLE_4_ALL[4]
    E = r["num_experts"][0]
    lines = [
        f"A top-2 MoE trained with the demo's settings ({len(r['num_experts'])} MoE layers x {E} experts of "
        f"{r['expert_bytes'][0] / 2**10:.0f} KiB, {r['all_experts_bytes'] / 2**20:.1f} MiB of experts; d_model "
        f"{r['model_config']['d_model']}) routing {r['tokens']:,} held-out tokens, decoded at batch 1 ({r['model']}). "
        "Counters are exact and come from the simulator, which the served runtime matches.",
        "", next(table), "",
        f"At 50% ({E // 2} of {E} experts per layer) Belady-MIN hits {mn['hit_rate']:.1%} against LRU's "
        f"{lru['hit_rate']:.1%} (Read-ME Table 4, batched inference at capacity 4: {cap[1]:.1%} vs {cap[0]:.1%}; ours "
        f"is batch-1 decoding). A lookahead of 16 tokens (a PreGate over queued tokens) loads {look['vs_min']:.2f}x "
        "Belady-MIN's bytes; knowing only the current token's layers (a PreGate while decoding one request) gives "
        "per-layer pools nothing to act on, so it equals LRU.",
        "", f"Served from an on-disk store (reads bypass the page cache), budget 50%, {r['served'][0]['tokens']} tokens; "
        f"in memory the model decodes {r['in_memory_decode_tok_s']:,.0f} tok/s:", "", next(table), "",
    ]
    if exact is not None:
        lines += [f"Exact prefetch (the next layer's experts, known ahead, loaded by a background thread while this "
                  f"layer computes) hides {exact:.0%} of what its reads cost as demand reads (\"read cost hidden\": 1 - "
                  "time the forward waited / (bytes read x the demand-read time per byte of the run without prefetch), "
                  "so reads slowed by the competing thread count against it); the next layer's router applied to this "
                  "layer's input predicts less well and reads more. On 2 cores the reader thread competes with the "
                  "computation, so tokens/s does not rise.", ""]
    lines += _direct_lines(r, sim)
    if r.get("host_ram"):
        load, cost = r["host_ram"]
        k = (cost.get("costs") or {}).get("threshold", ["?"])[0]
        lines += [
            "Fiddler's own setting keeps every expert in host memory and the cache on a GPU; its rule weighs moving an "
            "expert into the cache against computing it on the CPU where it is. `direct=\"cost\"` measures both at "
            "start-up, per layer shape, for 1 to 256 tokens. With no GPU here the cache can only be a second copy in "
            "the same RAM: loading is a pure copy, computing in place costs the same as in the cache, so the measured "
            f"rule computes every miss where it is stored (threshold {k} tokens) and decodes at "
            f"{cost['tok_s']:,.0f} vs {load['tok_s']:,.0f} tok/s. This checks the mechanism and its measurements; the "
            "GPU-versus-CPU trade-off itself needs a GPU:", "", next(table), "",
            "The measured costs of one expert (layer 0, medians of 7; loading one is a "
            f"{((cost.get('costs') or {}).get('layers') or [{}])[0].get('t_load', math.nan) * 1e3:.3f} ms copy here):",
            "", next(table), ""]
    if r.get("memory"):
        lines += ["Peak RSS, each configuration alone in a fresh process decoding the same tokens (torch itself is "
                  "most of it):", "", next(table), ""]
    lines += ["Mixed precision (HOBBIT): a miss whose gate weight is below the threshold is computed from the expert's "
              "int8 copy (per-row scales, about a quarter of the bytes) instead of loading it:", "", next(table), "",
              "Expert-aware batching (Read-ME Algorithm 1) of the same held-out sequences as concurrent requests "
              "decoding in lock step, queues keyed by each token's first expert at layer 0; unique experts a batch "
              "needs, per layer:", "", next(table)]
    rm = r.get("readme")
    if rm:
        batch = "; ".join(f"batch {b}: {v['fcfs']['unique_experts']:.2f} first-come vs "
                          f"{v['expert_aware']['unique_experts']:.2f} expert-aware" for b, v in rm["batching"].items())
        lines += [
            "",
            f"**A Read-ME model**: the demo's dense GPT refactored into a residual expert plus one expert per topic "
            f"({rm['num_experts']} per layer) with a PreGate routing every layer ahead of the backbone, tuned in two "
            f"alternating rounds ({READ_ME_MODEL}). On {rm['tokens']:,} held-out tokens a token keeps the previous "
            f"token's expert {rm['temporal_locality']:.0%} of the time (Read-ME: 71%), and its PreGate sends more than "
            f"1% of the tokens to {sum(x > 0.01 for x in rm['expert_share'])} of the {rm['num_experts']} experts. Hit "
            "rate by expert slots per layer (the residual expert stays resident):",
            "", next(table), "",
            f"Expert-aware batching of {rm['requests']} pre-gated requests decoding in lock step, unique experts per "
            f"batch: {batch} (Read-ME: 5.08 vs 3.51).",
        ]
    return "\n".join(lines)


__all__ = ["run_offload_bench", "simulate_grid", "serve_check", "mixed_precision_check", "demo_moe", "report_markdown",
           "tables",
           "POLICIES", "SERVED", "BUDGETS"]
