"""Evaluation against hand-computed values: a model whose next-token probabilities are known."""

import math

import pytest
import torch
from torch import nn

from moekit.data.corpus import Document
from moekit.data.dataset import TokenStream
from moekit.train import evaluate


class Known(nn.Module):
    """Logits that give the token ``t + 1`` probability ``p`` after token ``t`` and spread the rest
    evenly over the other ``V - 1`` tokens."""

    def __init__(self, V: int, p: float) -> None:
        super().__init__()
        self.V, self.p = V, p
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, ids):
        logits = torch.full((*ids.shape, self.V), math.log((1 - self.p) / (self.V - 1)))
        return logits.scatter(-1, ((ids + 1) % self.V).unsqueeze(-1), math.log(self.p)) * self.scale


def _stream():
    # two documents: "en" tokens 0..9 follow the rule (t -> t + 1), "fr" tokens repeat 3 (never the rule)
    ids = torch.tensor(list(range(10)) + [3] * 10)
    doc = torch.tensor([0] * 10 + [1] * 10, dtype=torch.int32)
    return TokenStream(ids, doc, [Document("a", language="en"), Document("b", language="fr")])


def test_loss_perplexity_and_per_label_perplexity_by_hand():
    V, p = 16, 0.5
    model = Known(V, p).train()
    r = evaluate(model, _stream(), seq_len=4, batch_size=2, label_fields=("language",))
    # windows of 4 targets: positions 1..16 of the stream (4 windows); targets 1..9 of "en" follow the
    # rule (nll -ln p), target 10 (first "fr" token, 3 after 9) and the rest do not (nll -ln((1-p)/15))
    hit, miss = -math.log(p), -math.log((1 - p) / (V - 1))
    assert r.tokens == 16
    assert r.loss == pytest.approx((9 * hit + 7 * miss) / 16)
    assert r.ppl == pytest.approx(math.exp(r.loss))
    # a target's label is its own document's: 9 "en" targets (1..9), 7 "fr" ones
    assert r.per_label["language"]["en"] == pytest.approx(math.exp(hit))
    assert r.per_label["language"]["fr"] == pytest.approx(math.exp(miss))
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="too small for seq_len=32"):
        evaluate(model, _stream(), seq_len=32)
