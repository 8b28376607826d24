"""What the demo measures of one model (moekit/apps/demo/measure.py): expert-load balance by hand,
speed and step time of a tiny GPT."""

import pytest
import torch

from moekit.apps.demo.measure import load_balance, measure_speed, step_time
from moekit.models import GPT, GPTConfig
from moekit.train import TrainConfig
from tests.trainrun import VOCAB, stream


def test_load_balance_by_hand():
    loads = {"blocks.0": {"labels": ["en", "fr"], "counts": [[3, 1, 0, 0], [1, 3, 0, 4]]},  # per expert 4 4 0 4
             "blocks.1": {"labels": ["en", "fr"], "counts": [[2, 2], [2, 2]]},
             "blocks.2": {"labels": ["en"], "counts": [[0, 0]]}}  # no assignments: left out
    assert load_balance(loads) == pytest.approx((4 / 3 + 1.0) / 2)
    assert load_balance({}) is None


def _tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, d_ff=32))


def test_measure_speed_and_step_time_of_a_tiny_gpt():
    speed = measure_speed(_tiny(), vocab=VOCAB, seq_len=16, repeats=1)
    assert set(speed) == {"prefill_tok_s", "decode_tok_s"} and all(v > 0 for v in speed.values())
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, lr=1e-3, log_every=5)
    assert step_time(_tiny(), stream(), cfg, steps=2) > 0
