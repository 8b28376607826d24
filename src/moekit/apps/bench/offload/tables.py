"""The offload benchmark's tables, ``(title, header, rows)``, from a result dict: printed by the
bench and written, in the same order, to its Markdown report."""

from __future__ import annotations

from moekit.apps.bench.offload.serve import hidden_vs_demand

Table = tuple[str, list[str], list[list]]

#: Read-ME Table 4 (batched inference, 8 experts): capacity -> (LRU, Belady) hit rate
READ_ME_TABLE_4_ALL = {2: (0.3390, 0.4416), 3: (0.5242, 0.6182), 4: (0.6695, 0.7721), 5: (0.8348, 0.8803)}


def _matches(x: dict) -> str:
    """Whether a served run's counters equal the simulator's: yes, NO, or n/a (not compared)."""
    return {True: "yes", False: "NO"}.get(x.get("matches_simulator"), "n/a")


def _policies(r: dict) -> Table:
    budgets = r["budgets"]
    sim = {(x["policy"], x["budget"]): x for x in r["simulated"]}
    labels = list(dict.fromkeys(x["policy"] for x in r["simulated"]))
    return (f"cache policies: {r['tokens']:,} held-out tokens, {len(r['num_experts'])} MoE layers x "
            f"{r['num_experts'][0]} experts of {r['expert_bytes'][0] / 2**10:.0f} KiB, batch-1 decode",
            ["policy", *[f"{b:.0%}: hit rate / KiB per token / vs MIN" for b in budgets]],
            [[lab, *[f"{sim[lab, b]['hit_rate']:.1%} / {sim[lab, b]['bytes_per_token'] / 2**10:,.0f} / "
                     f"{sim[lab, b]['vs_min']:.2f}x" for b in budgets]] for lab in labels])


def _served(r: dict) -> Table:
    served = r["served"]
    return (f"served from disk (page cache bypassed), budget 50%, {served[0]['tokens']} tokens at batch 1; in "
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
              _matches(x), f"{x['max_abs_logit_diff']:.1e}"]
             for x, h in zip(served, hidden_vs_demand(served))])


def _host_ram(r: dict) -> list[Table]:
    """The host-RAM runs and, when measured, the costs one expert's direct rule was decided by."""
    ram = r["host_ram"]
    out = [("experts held in host RAM, the cache a second copy in the same memory: budget 50%, "
            f"{ram[0]['tokens']} tokens at batch 1",
            ["configuration", "tok/s", "hit rate", "misses computed where stored", "KiB copied / token",
             "= simulator", "max abs logit diff"],
            [[x["policy"], f"{x['tok_s']:,.0f}", f"{x['hit_rate']:.1%}", f"{x['direct'] / max(x['misses'], 1):.0%}",
              f"{(x['bytes_loaded'] - x['direct'] * r['expert_bytes'][0]) / x['tokens'] / 2**10:,.0f}",
              _matches(x), f"{x['max_abs_logit_diff']:.1e}"]
             for x in ram])]
    cal = next((x["costs"] for x in ram if x.get("costs")), None)
    if cal:
        c = cal["layers"][0]
        out.append((f"measured costs of one expert (layer 0, device {cal['device']}, experts in {cal['host']}), "
                    f"medians: load {1e3 * c['t_load']:.3f} ms; compute from the host copy while fewer than "
                    f"{c['threshold']} tokens need it",
                    ["tokens", "load + compute in the cache, ms", "compute where stored, ms"],
                    [[n, f"{1e3 * (c['t_load'] + tc):.3f}", f"{1e3 * th:.3f}"]
                     for n, tc, th in zip(c["tokens"], c["t_cache"], c["t_host"])]))
    return out


def _memory(r: dict) -> Table:
    return ("peak RSS, each configuration alone in a fresh process decoding the same tokens",
            ["configuration", "expert MiB in RAM", "peak RSS MB", "growth after start MB"],
            [["in memory" if m["budget"] is None else f"served, budget {m['budget']:.0%}",
              f"{(m.get('resident_expert_bytes') or r['all_experts_bytes']) / 2**20:.1f}",
              f"{m['peak_rss_mb']:.0f}", f"{m['model_rss_mb']:.0f}"] for m in r["memory"]])


def _mixed_precision(r: dict) -> Table:
    return (f"mixed precision (HOBBIT): misses with a gate weight below the threshold read the int8 copy; budget "
            f"50%, LRU per layer, {r['mixed_precision'][0]['tokens']} tokens",
            ["int8 when weight <", "accesses served int8", "hit rate", "KiB read / token", "ppl", "ppl in memory",
             "max abs logit diff"],
            [["never" if x["low_threshold"] is None else f"{x['low_threshold']:g}", f"{x['low_bit_share']:.1%}",
              f"{x['hit_rate']:.1%}", f"{x['bytes_per_token'] / 2**10:,.0f}", f"{x['ppl']:.3f}",
              f"{x['ppl_in_memory']:.3f}", f"{x['max_abs_logit_diff']:.1e}"] for x in r["mixed_precision"]])


def _batching(r: dict) -> Table:
    return ("expert-aware batching (Read-ME Algorithm 1, queues keyed by the layer-0 top-1 expert): unique "
            "experts per batch and layer",
            ["batch size", "first come, first served", "expert-aware"],
            [[b, f"{v['fcfs']['unique_experts']:.2f}", f"{v['expert_aware']['unique_experts']:.2f}"]
             for b, v in r.get("batching", {}).items()])


def _readme(rm: dict) -> Table:
    cols = [k for k in rm["hit_rates"][0] if k != "capacity"]
    rows = []
    for row in rm["hit_rates"]:
        paper = READ_ME_TABLE_4_ALL.get(row["capacity"])
        rows.append([row["capacity"], *[f"{row[c]:.1%}" for c in cols],
                     "—" if paper is None else f"{paper[0]:.1%} / {paper[1]:.1%}"])
    return (f"Read-ME model ({rm['num_experts']} experts per layer, PreGate): hit rate by expert slots per "
            f"layer, {rm['tokens']:,} held-out tokens", ["slots", *cols, "Read-ME Table 4: LRU / Belady"], rows)


def tables(r: dict) -> list[Table]:
    """``(title, header, rows)`` of every table of a result: printed by the bench, written to the report."""
    out = [_policies(r), _served(r)]
    if r.get("host_ram"):
        out += _host_ram(r)
    if r.get("memory"):
        out.append(_memory(r))
    out += [_mixed_precision(r), _batching(r)]
    if r.get("readme"):
        out.append(_readme(r["readme"]))
    return out
