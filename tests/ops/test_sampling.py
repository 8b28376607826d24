"""Next-token choice against hand-worked truncations and a per-row reference written from HF's definition."""

import math

import pytest
import torch

from moekit.ops.sampling import Sampling, eos_ids, next_token, truncate_logits

# probabilities 0.5, 0.25, 0.15, 0.1 in a shuffled order: token 2 > 0 > 3 > 1
PROBS = [0.25, 0.1, 0.5, 0.15]
LOGITS = torch.tensor([[math.log(p) for p in PROBS]])


def _kept(logits):
    return sorted(torch.isfinite(logits[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize("top_p, kept", [
    (0.5, [2]),  # 0.5 reaches 0.5
    (0.51, [0, 2]),  # 0.5 < 0.51 <= 0.75
    (0.75, [0, 2]),
    (0.76, [0, 2, 3]),  # 0.75 < 0.76 <= 0.9
    (0.9, [0, 2, 3]),
    (0.95, [0, 1, 2, 3]),
    (0.01, [2]),
    (0.0, [2]),  # at least one token: the limit p -> 0 is greedy
    (1.0, [0, 1, 2, 3]),
])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, kept):
    assert _kept(truncate_logits(LOGITS, top_p=top_p)) == kept


@pytest.mark.parametrize("top_k, kept", [(1, [2]), (2, [0, 2]), (3, [0, 2, 3]), (4, [0, 1, 2, 3]), (9, [0, 1, 2, 3])])
def test_top_k_keeps_the_k_most_likely(top_k, kept):
    assert _kept(truncate_logits(LOGITS, top_k=top_k)) == kept


def test_top_k_then_top_p_and_kept_logits_unchanged():
    out = truncate_logits(LOGITS, top_k=3, top_p=0.6)
    # after top-k the kept tokens renormalise to 0.5/0.9, 0.25/0.9, 0.15/0.9; top-p 0.6 keeps 2 and 0
    assert _kept(out) == [0, 2]
    assert torch.allclose(out[0, [0, 2]], LOGITS[0, [0, 2]])


def _reference(row, temperature, top_k, top_p):
    """The sampling distribution of one row, written from the definition with plain Python."""
    scaled = [v / temperature for v in row]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = order[:top_k] if top_k else order
    z = sum(math.exp(scaled[i]) for i in keep)
    if top_p is not None:
        mass, chosen = 0.0, []
        for i in keep:
            if chosen and mass >= top_p:
                break
            chosen.append(i)
            mass += math.exp(scaled[i]) / z
        keep = chosen
    z = sum(math.exp(scaled[i]) for i in keep)
    return [math.exp(scaled[i]) / z if i in keep else 0.0 for i in range(len(row))]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                       (0.9, 6, 0.7)])
def test_sampled_frequencies_follow_the_reference_distribution(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    n = 20000
    draws = next_token(logits.repeat_interleave(n, 0), Sampling(temperature, top_k, top_p),
                       torch.Generator().manual_seed(1)).view(3, n)
    for b in range(3):
        want = _reference(logits[b].tolist(), temperature, top_k, top_p)
        freq = torch.bincount(draws[b], minlength=10).double() / n
        for v in range(10):
            if want[v] == 0:
                assert freq[v] == 0, (b, v)
            else:  # 5 standard errors
                assert abs(freq[v] - want[v]) < 5 * math.sqrt(want[v] * (1 - want[v]) / n) + 1e-9, (b, v)


def test_greedy_is_the_argmax_whatever_top_k_and_top_p():
    logits = torch.randn(4, 9)
    assert torch.equal(next_token(logits, Sampling(0.0, top_k=3, top_p=0.2)), logits.argmax(-1, keepdim=True))


def test_the_same_seed_draws_the_same_tokens():
    logits = torch.randn(4, 50)
    s = Sampling(1.0, top_k=20, top_p=0.9)
    a = next_token(logits, s, torch.Generator().manual_seed(3))
    b = next_token(logits, s, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw, msg", [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                                     ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                     ({"temperature": float("nan")}, "temperature")])
def test_bad_options_are_refused_by_name(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        Sampling(**kw)


def test_eos_ids():
    assert eos_ids(None, 10) == [] and eos_ids(3, 10) == [3] and eos_ids([1, 9], 10) == [1, 9]
    with pytest.raises(ValueError, match="eos_token_id: 10"):
        eos_ids(10, 10)
