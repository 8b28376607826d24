"""moekit bench offload: the tables and the Markdown report of a small hand-made result."""

from moekit.apps.bench.offload import report_markdown, tables
from moekit.apps.bench.offload.simulate import MIN_LABEL

SIM = {"LRU, per layer": (0.25, 2.0, 2.0), "Belady, lookahead 16 tokens": (0.5, 1.25, 1.25),
       MIN_LABEL: (0.6, 1.0, 1.0)}  # label -> (hit rate, loads per token, vs MIN); experts of 1 KiB


def _served(policy: str, prefetch=None, **kw) -> dict:
    return {"policy": policy, "prefetch": prefetch, "tokens": 10, "tok_s": 1000.0, "hit_rate": 0.5, "misses": 10,
            "prefetched": 0, "direct": 0, "read_s": 0.02, "exposed_s": 0.02, "bytes_loaded": 20480,
            "bytes_per_token": 2048.0, "max_abs_logit_diff": 1e-6, "matches_simulator": True, **kw}


def _result() -> dict:
    return {
        "tokens": 1000, "num_experts": [4, 4], "expert_bytes": [1024, 1024], "all_experts_bytes": 8192,
        "model": "m", "model_config": {"d_model": 16}, "budgets": [0.5], "in_memory_decode_tok_s": 5000.0,
        "simulated": [{"policy": p, "budget": 0.5, "hit_rate": h, "loads_per_token": n, "bytes_per_token": 1024 * n,
                       "vs_min": v} for p, (h, n, v) in SIM.items()],
        "served": [_served("LRU, per layer"),
                   _served("Belady, lookahead = this token + exact prefetch", "future", exposed_s=0.005,
                           prefetched=10, prefetch_precision=1.0, prefetch_recall=0.5, matches_simulator=False)],
        "mixed_precision": [{"low_threshold": None, "tokens": 10, "low_bit_share": 0.0, "hit_rate": 0.5,
                             "bytes_per_token": 2048.0, "ppl": 3.0, "ppl_in_memory": 3.0, "max_abs_logit_diff": 0.0}],
        "batching": {"4": {"fcfs": {"unique_experts": 3.0}, "expert_aware": {"unique_experts": 1.5}}},
    }


def test_tables_of_a_hand_made_result():
    ts = tables(_result())
    assert [len(t) for t in ts] == [3] * 4  # policies, served, mixed precision, batching
    title, header, rows = ts[0]
    assert title == "cache policies: 1,000 held-out tokens, 2 MoE layers x 4 experts of 1 KiB, batch-1 decode"
    assert header == ["policy", "50%: hit rate / KiB per token / vs MIN"]
    assert rows[0] == ["LRU, per layer", "25.0% / 2 / 2.00x"]
    served = ts[1][2]
    # the same bytes cost 0.02 s as demand reads; the prefetching run waited 0.005 s: 75% hidden
    assert served[1][8] == "75%" and served[0][8] == "—"
    assert served[1][9] == "1.00 / 0.50" and [r[10] for r in served] == ["yes", "NO"]
    assert ts[3][2] == [["4", "3.00", "1.50"]]


def test_report_markdown_of_a_hand_made_result():
    md = report_markdown(_result())
    assert md.startswith("A top-2 MoE trained with the demo's settings (2 MoE layers x 4 experts of 1 KiB, "
                         "0.0 MiB of experts; d_model 16) routing 1,000 held-out tokens")
    assert ("At 50% (2 of 4 experts per layer) Belady-MIN hits 60.0% against LRU's 25.0%" in md
            and "loads 1.25x Belady-MIN's bytes" in md)
    assert "hides 75% of what its reads cost" in md
    assert "| batch size | first come, first served | expert-aware |" in md
    assert md.count("| policy |") == 1 and md.endswith("| 4 | 3.00 | 1.50 |")
    # no bypass rows, no host-RAM runs, no Read-ME model: those paragraphs are left out
    assert "A miss need not be admitted" not in md and "Fiddler's own setting" not in md and "Read-ME model" not in md
