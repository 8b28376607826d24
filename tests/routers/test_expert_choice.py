"""Expert-choice routing against a naive implementation and hand-worked values."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.routers import ExpertChoice
from tests.reference import identity_router


@given(T=st.integers(0, 40), E=st.integers(1, 8), cf=st.floats(0.1, 4.0))
def test_expert_choice_takes_top_tokens(T, E, cf):
    router = ExpertChoice(cf).bind(6, E)
    x = torch.randn(T, 6)
    r = router(x)
    C = min(T, math.ceil(cf * T / E))
    assert r.counts().tolist() == [C] * E
    probs = torch.softmax(r.logits, -1)
    for e in range(E):
        chosen = r.token[r.expert == e]
        torch.testing.assert_close(probs[chosen, e], torch.topk(probs[:, e], C).values)


def test_expert_choice_hand_worked():
    """T=5, E=2, capacity_factor 1: C = ceil(5 / 2) = 3 tokens per expert, chosen by softmax probability
    (over experts, per token), which here is not the logit order."""
    x = torch.tensor([[3.0, 3.0], [1.0, 0.0], [0.5, -1.0], [0.0, 0.2], [-1.0, -3.0]])
    router = identity_router(ExpertChoice(1.0), 2)
    assert router.capacity(5) == 3
    r = router(x)
    p0 = torch.sigmoid(x[:, 0] - x[:, 1])  # P(expert 0) = .5, .731, .818, .450, .881
    # expert 0: tokens 4, 2, 1 (by logit it would be 0, 1, 2); expert 1: tokens 3, 0, 1
    assert r.expert.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.token.tolist() == [4, 2, 1, 3, 0, 1]
    torch.testing.assert_close(r.weight, torch.stack([p0[4], p0[2], p0[1], 1 - p0[3], 1 - p0[0], 1 - p0[1]]))
