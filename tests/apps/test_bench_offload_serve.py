"""moekit bench offload: the served runs on a small MoE, and the prefetch accounting by hand."""

import math

import pytest
import torch

from moekit.apps.bench.offload import mixed_precision_check, serve_check
from moekit.apps.bench.offload.serve import decode, hidden_vs_demand
from moekit.models import GPT, GPTConfig
from moekit.offload import record_trace, write_store


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, d_ff=32).with_moe(4, 2))
    model.eval()
    ids = torch.randint(0, 64, (2, 12))
    store = write_store(model, tmp_path_factory.mktemp("store") / "store", low_bit=True)
    return model, store, ids, record_trace(model, ids)


def test_decode_token_by_token_equals_the_full_forward(served):
    model, _, ids, _ = served
    with torch.no_grad():
        torch.testing.assert_close(decode(model, ids[:1]), model(ids[:1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [("LRU", "lru", "layer", math.inf, None, None),
                                 ("Belady + prefetch", "belady", "layer", 1, "future", None),
                                 ("Belady-MIN + bypass", "belady", "layer", math.inf, None, "future")])
def test_serve_check_matches_the_simulator(served, cfg):
    model, store, ids, trace = served
    row = serve_check(model, store, ids[:1], trace.head(12), 0.5, *cfg)
    assert row["policy"] == cfg[0] and row["tokens"] == 12
    assert row["matches_simulator"] and row["max_abs_logit_diff"] <= 1e-4


def test_mixed_precision_check_without_int8_keeps_the_perplexity(served):
    model, store, ids, _ = served
    row = mixed_precision_check(model, store, ids, 0.5, None)
    assert row["low_bit_share"] == 0 and row["tokens"] == 24
    assert row["ppl"] == pytest.approx(row["ppl_in_memory"], rel=1e-4)


def test_hidden_vs_demand_by_hand():
    rows = [{"prefetch": None, "read_s": 2.0, "bytes_loaded": 1000, "exposed_s": 2.0},
            {"prefetch": "future", "read_s": 3.0, "bytes_loaded": 500, "exposed_s": 0.25}]
    # demand reads cost 2 ms per byte: 500 bytes would cost 1 s, the forward waited 0.25 s
    assert hidden_vs_demand(rows) == [None, 0.75]
