"""The offload benchmark in Markdown, for the demo's report: its tables and what they show."""

from __future__ import annotations

import math
from collections.abc import Iterator

from moekit.apps.bench.offload.fixtures import READ_ME_MODEL
from moekit.apps.bench.offload.serve import hidden_vs_demand
from moekit.apps.bench.offload.simulate import MIN_LABEL
from moekit.apps.bench.offload.tables import READ_ME_TABLE_4_ALL, tables
from moekit.apps.report import markdown_table
from moekit.offload import STREAM_BYTES

BYPASS_MIN = "Belady-MIN + bypass to the store"


def _ms_per_read(x: dict) -> float:
    return 1e3 * x["read_s"] / max(x["misses"] + x["prefetched"], 1)


def _direct_lines(r: dict, sim: dict) -> list[str]:
    """What computing misses straight from the store (not admitting them) did, in numbers."""
    served = {x["policy"]: x for x in r["served"]}
    names = ("LRU, per layer", "LRU + Fiddler's rule (compute misses from the store)", "Belady, lookahead 16 tokens",
             "Belady, lookahead 16 tokens + bypass to the store")
    if not all((n, 0.5) in sim for n in (*names, MIN_LABEL, BYPASS_MIN)) or not all(n in served for n in names):
        return []
    lru, fid, look, lookb = (sim[n, 0.5] for n in names)
    mn, mnb = sim[MIN_LABEL, 0.5], sim[BYPASS_MIN, 0.5]
    s_lru, s_fid, s_look, s_lookb = (served[n] for n in names)
    cut = {b: 1 - sim[BYPASS_MIN, b]["loads_per_token"] / sim[MIN_LABEL, b]["loads_per_token"]
           for b in r["budgets"] if (MIN_LABEL, b) in sim}
    return [
        f"A miss need not be admitted: it can be computed straight from the store, streamed through a "
        f"{STREAM_BYTES >> 10} KiB buffer, "
        "evicting nothing. Fiddler decides this by cost: computing on the CPU, where the weights are, beats moving "
        "them to the GPU when few tokens need the expert. This machine has no second device: the cache and the "
        f"store's reader share the same DRAM and cores, so a miss computed from the store reads the same bytes as a "
        f"load ({_ms_per_read(s_lookb):.2f} vs {_ms_per_read(s_look):.2f} ms per read in the served runs above) and "
        "the choice only changes what the cache keeps.",
        "",
        f"- Fiddler's rule at batch 1 (every miss has one token) stops admitting once the cache is full, so the cache "
        f"keeps the experts it filled with first: over the {r['tokens']:,}-token trace {fid['hit_rate']:.1%} hits "
        f"against LRU's {lru['hit_rate']:.1%} at 50%, {fid['bytes_per_token'] / lru['bytes_per_token']:.2f}x the "
        f"bytes (the short served run: {s_fid['hit_rate']:.1%} vs {s_lru['hit_rate']:.1%} hits, {s_fid['tok_s']:,.0f} "
        f"vs {s_lru['tok_s']:,.0f} tok/s, {_ms_per_read(s_fid):.2f} vs {_ms_per_read(s_lru):.2f} ms per read). "
        "Without a faster place to compute, load-on-miss wins.",
        f"- Belady's rule with bypass (compute from the store when the known future needs the missed expert after "
        f"every expert it could evict; with the whole future it never reads more than Belady-MIN, tested): Belady-MIN + bypass "
        f"reads {mnb['loads_per_token']:.2f} experts per token against Belady-MIN's {mn['loads_per_token']:.2f} "
        f"(fewer reads: " + ", ".join(f"{v:.0%} at {b:.0%}" for b, v in cut.items()) + "); with 16 tokens of lookahead "
        f"{lookb['hit_rate']:.1%} vs {look['hit_rate']:.1%} hits, served {s_lookb['tok_s']:,.0f} vs "
        f"{s_look['tok_s']:,.0f} tok/s with {s_lookb['bytes_per_token'] / 2**10:,.0f} vs "
        f"{s_look['bytes_per_token'] / 2**10:,.0f} KiB read per token.",
        "",
    ]


def _policy_lines(r: dict, sim: dict, table: Iterator[str]) -> list[str]:
    """The model, the policy table and the served table, with what they show at 50%."""
    lru, mn = sim["LRU, per layer", 0.5], sim[MIN_LABEL, 0.5]
    look = sim["Belady, lookahead 16 tokens", 0.5]
    cap = READ_ME_TABLE_4_ALL[4]
    E = r["num_experts"][0]
    return [
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


def _prefetch_lines(r: dict) -> list[str]:
    """How much of its reads' cost exact prefetch hid, when it was served."""
    hidden = hidden_vs_demand(r["served"])
    exact = next((h for x, h in zip(r["served"], hidden) if x["policy"].startswith("Belady, lookahead = this token +")),
                 None)
    if exact is None:
        return []
    return [f"Exact prefetch (the next layer's experts, known ahead, loaded by a background thread while this "
            f"layer computes) hides {exact:.0%} of what its reads cost as demand reads (\"read cost hidden\": 1 - "
            "time the forward waited / (bytes read x the demand-read time per byte of the run without prefetch), "
            "so reads slowed by the competing thread count against it); the next layer's router applied to this "
            "layer's input predicts less well and reads more. On 2 cores the reader thread competes with the "
            "computation, so tokens/s does not rise.", ""]


def _host_ram_lines(r: dict, table: Iterator[str]) -> list[str]:
    """Fiddler's own setting (experts in host RAM) and the costs its measured rule weighed."""
    load, cost = r["host_ram"]
    costs = cost.get("costs") or {}
    k = costs.get("threshold", ["?"])[0]
    return [
        "Fiddler's own setting keeps every expert in host memory and the cache on a GPU; its rule weighs moving an "
        "expert into the cache against computing it on the CPU where it is. `direct=\"cost\"` measures both at "
        "start-up, per layer shape, for 1 to 256 tokens. With no GPU here the cache can only be a second copy in "
        "the same RAM: loading is a pure copy, computing in place costs the same as in the cache, so the measured "
        f"rule computes every miss where it is stored (threshold {k} tokens) and decodes at "
        f"{cost['tok_s']:,.0f} vs {load['tok_s']:,.0f} tok/s. This checks the mechanism and its measurements; the "
        "GPU-versus-CPU trade-off itself needs a GPU:", "", next(table), "",
        "The measured costs of one expert (layer 0, medians of 7; loading one is a "
        f"{(costs.get('layers') or [{}])[0].get('t_load', math.nan) * 1e3:.3f} ms copy here):",
        "", next(table), ""]


def _readme_lines(rm: dict, table: Iterator[str]) -> list[str]:
    """The Read-ME model's locality, hit rates by expert slots and batching."""
    batch = "; ".join(f"batch {b}: {v['fcfs']['unique_experts']:.2f} first-come vs "
                      f"{v['expert_aware']['unique_experts']:.2f} expert-aware" for b, v in rm["batching"].items())
    return [
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


def report_markdown(r: dict) -> str:
    """The benchmark's tables and what they show, for the demo's report."""
    table = iter([markdown_table(header, rows) for _, header, rows in tables(r)])
    sim = {(x["policy"], x["budget"]): x for x in r["simulated"]}
    lines = _policy_lines(r, sim, table) + _prefetch_lines(r) + _direct_lines(r, sim)
    if r.get("host_ram"):
        lines += _host_ram_lines(r, table)
    if r.get("memory"):
        lines += ["Peak RSS, each configuration alone in a fresh process decoding the same tokens (torch itself is "
                  "most of it):", "", next(table), ""]
    lines += ["Mixed precision (HOBBIT): a miss whose gate weight is below the threshold is computed from the expert's "
              "int8 copy (per-row scales, about a quarter of the bytes) instead of loading it:", "", next(table), "",
              "Expert-aware batching (Read-ME Algorithm 1) of the same held-out sequences as concurrent requests "
              "decoding in lock step, queues keyed by each token's first expert at layer 0; unique experts a batch "
              "needs, per layer:", "", next(table)]
    if r.get("readme"):
        lines += _readme_lines(r["readme"], table)
    return "\n".join(lines)
