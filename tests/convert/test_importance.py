"""Attention importance for a converted BERT's dynamic-K layers: hand-worked values, the values the
router receives end to end, and the user's mistakes."""

import copy

import pytest
import torch
import transformers

from moekit.convert import attach_importance, attention_importance, partition, upcycle, valid_tokens
from moekit.layer import MoE

# One sequence of 4 tokens, the last one padding; 2 heads. Rows are queries, columns keys. The
# padding query's row is a distribution over valid keys like the others (BERT does not mask
# queries), and must be ignored; nobody attends to the padding key.
A = torch.tensor([[[0.50, 0.25, 0.25, 0.0],
                   [0.50, 0.50, 0.00, 0.0],
                   [0.25, 0.25, 0.50, 0.0],
                   [1.00, 0.00, 0.00, 0.0]],
                  [[1.00, 0.00, 0.00, 0.0],
                   [0.25, 0.50, 0.25, 0.0],
                   [0.50, 0.00, 0.50, 0.0],
                   [0.00, 0.00, 1.00, 0.0]]]).unsqueeze(0)  # [B=1, H=2, T=4, T=4]
VALID = torch.tensor([[True, True, True, False]])
# received, by hand: column sums over the 3 valid queries, head 0: 1.25, 1.0, 0.75; head 1: 1.75, 0.5,
# 0.75; mean over heads 1.5, 0.75, 0.75 (= n * mean_h sum_q A / n with n = 3; averages 1 over the
# valid tokens); the padding token 0.
RECEIVED = torch.tensor([[1.5, 0.75, 0.75, 0.0]])
# paid, by hand: diagonals 0.5, 0.5, 0.5 and 1.0, 0.5, 0.5; mean over heads 0.75, 0.5, 0.5; times n = 3.
PAID = torch.tensor([[2.25, 1.5, 1.5, 0.0]])


def test_hand_worked_importance():
    assert torch.allclose(attention_importance(A, VALID, "received"), RECEIVED, atol=1e-7)
    assert torch.allclose(attention_importance(A, VALID, "paid"), PAID, atol=1e-7)
    # the same from the additive mask BERT's eager attention receives
    additive = torch.zeros(1, 1, 4, 4).masked_fill(~VALID[:, None, None, :], torch.finfo(torch.float32).min)
    assert torch.equal(valid_tokens(additive, 1, 4), VALID)
    assert torch.equal(valid_tokens(VALID[:, None, None, :].expand(1, 1, 4, 4), 1, 4), VALID)
    assert torch.equal(valid_tokens(torch.tensor([[1, 1, 1, 0]]), 1, 4), VALID)
    assert torch.equal(valid_tokens(None, 2, 3), torch.ones(2, 3, dtype=torch.bool))
    # no padding: uniform attention gives 1 everywhere under both signals
    uniform = torch.full((2, 3, 5, 5), 0.2)
    for signal in ("received", "paid"):
        assert torch.allclose(attention_importance(uniform, None, signal), torch.ones(2, 5), atol=1e-6)


def _bert(attn="eager"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=100, pad_token_id=0, attn_implementation=attn)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # sharper attention than a random init's near-uniform one
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(30)
    return model


def _dynamic(model):
    return partition(model, 4, router="dynamic_k", router_args={"k_min": 1, "k_max": 3})


IDS = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _reference(attn: torch.Tensor, mask: torch.Tensor, signal: str) -> torch.Tensor:
    """Naive loops over sequences, heads, queries, tokens."""
    B, H, T, _ = attn.shape
    out = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(T):
            if not mask[b, t]:
                continue
            if signal == "received":
                out[b, t] = sum(float(attn[b, h, q, t]) for h in range(H) for q in range(T) if mask[b, q]) / H
            else:
                out[b, t] = n * sum(float(attn[b, h, t, t]) for h in range(H)) / H
    return out


@pytest.mark.parametrize("signal", ["received", "paid"])
def test_router_gets_the_attention_importance_of_its_layer(signal):
    model = _dynamic(_bert())
    handle = attach_importance(model, signal)
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == len(out.attentions) == 2
    for moe, attn in zip(moes, out.attentions):
        want = _reference(attn, MASK, signal).reshape(-1)
        got = moe.last_routing.importance
        assert torch.allclose(got, want, atol=1e-5), (got, want)
        assert torch.equal(moe.last_routing.k_per_token[MASK.reshape(-1) == 0], torch.ones(2, dtype=torch.long))
    # a deep copy carries hooks that feed the copy's own layers
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(input_ids=IDS, attention_mask=MASK)
    for a, b in zip(moes, [m for m in twin.modules() if isinstance(m, MoE)]):
        assert torch.allclose(a.last_routing.importance, b.last_routing.importance, atol=1e-6)
    handle.remove()
    with pytest.raises(ValueError, match="attach_importance"):
        model(input_ids=IDS, attention_mask=MASK)


def test_trains_with_importance():
    model = _dynamic(_bert()).train()
    attach_importance(model, "received")
    model(input_ids=IDS, attention_mask=MASK).last_hidden_state.pow(2).mean().backward()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    assert moe.gate.weight.grad is not None and moe.experts.down_proj.grad is not None


def test_mistakes_are_one_line_errors():
    dense = _bert()
    with pytest.raises(ValueError, match="signal"):
        attach_importance(_dynamic(dense), "sent")
    with pytest.raises(ValueError, match="eager"):
        attach_importance(_dynamic(_bert("sdpa")))
    with pytest.raises(ValueError, match="no converted layer"):
        attach_importance(upcycle(dense, 4, k=2))
    model = _dynamic(dense)
    with pytest.raises(ValueError, match="attach_importance"):
        model(input_ids=IDS)
    attach_importance(model)
    with pytest.raises(ValueError, match="already attached"):
        attach_importance(model, "paid")
    model(input_ids=IDS)  # the first attachment still works
    with pytest.raises(ValueError, match="T, T"):
        attention_importance(torch.ones(1, 2, 3, 4))
