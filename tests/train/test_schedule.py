"""The learning-rate schedule (moekit/train/schedule.py): warm-up then cosine, values worked by hand."""

import math

import pytest

from moekit.train import TrainConfig
from moekit.train.schedule import warmup_cosine


def test_warmup_is_linear_and_reaches_lr_at_its_last_step():
    # warmup 4, lr 1: steps 0..3 give 1/4, 2/4, 3/4, 4/4
    assert [warmup_cosine(s, 20, 1.0, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_from_lr_to_the_floor():
    # steps 10, warmup 2, lr 2, floor 0.1: t = (step - 2) / 8
    # t = 0: 2 * (0.1 + 0.9) = 2; t = 1/4: 2 * (0.1 + 0.45 * (1 + cos(pi/4))) = 0.2 + 0.9 * 1.70710678...
    # t = 1/2: 2 * (0.1 + 0.45) = 1.1; t = 1: 2 * 0.1 = 0.2, and it stays there
    assert warmup_cosine(2, 10, 2.0, 2) == pytest.approx(2.0, rel=1e-15)
    assert warmup_cosine(4, 10, 2.0, 2) == pytest.approx(0.2 + 0.9 * (1 + math.sqrt(0.5)), rel=1e-14)
    assert warmup_cosine(6, 10, 2.0, 2) == pytest.approx(1.1, rel=1e-14)
    assert warmup_cosine(10, 10, 2.0, 2) == pytest.approx(0.2, rel=1e-14)
    assert warmup_cosine(15, 10, 2.0, 2) == pytest.approx(0.2, rel=1e-14)


def test_floor_and_no_warmup():
    # floor 0: ends at 0; at the middle lr / 2. No warm-up: starts at lr
    assert warmup_cosine(0, 4, 1.0, 0, floor=0.0) == 1.0
    assert warmup_cosine(2, 4, 1.0, 0, floor=0.0) == pytest.approx(0.5, rel=1e-15)
    assert warmup_cosine(4, 4, 1.0, 0, floor=0.0) == pytest.approx(0.0, abs=1e-16)
    assert warmup_cosine(1, 4, 1.0, 0, floor=0.5) == pytest.approx(0.5 + 0.25 * (1 + math.sqrt(0.5)), rel=1e-14)


def test_the_trainer_follows_the_schedule():
    c = TrainConfig(steps=10, lr=2.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [c.lr_at(s) for s in (0, 1, 6, 10)] == pytest.approx([1.0, 2.0, 1.1, 0.2], rel=1e-14)
