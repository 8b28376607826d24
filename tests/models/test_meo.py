"""MEO (models/meo.py) against per-sequence loops written here from the paper's equations, Shazeer's
noisy top-k load against a direct computation of P(expert in top k), and the GPT's task-level use."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.layer import aux_loss
from moekit.models import GPT, MEO, GPTConfig
from moekit.models.meo import cv_squared, noisy_top_k


def swiglu_ffn(x, w1, w2):
    """``down(silu(gate x) * up x)`` of one expert: ``w1 [2F, D]`` (gate rows first), ``w2 [D, F]``."""
    g, u = (x @ w1.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w2.T


def reference(layer: MEO, x, idx, w):
    """Per sequence: the merged weights by an explicit sum (merge) or the weighted sum of outputs."""
    w1, w2 = layer.experts.gate_up_proj, layer.experts.down_proj
    out = []
    for b in range(x.shape[0]):
        if layer.merge:
            m1 = sum(w[b, j] * w1[idx[b, j]] for j in range(layer.k))
            m2 = sum(w[b, j] * w2[idx[b, j]] for j in range(layer.k))
            out.append(swiglu_ffn(x[b], m1, m2))
        else:
            out.append(sum(w[b, j] * swiglu_ffn(x[b], w1[idx[b, j]], w2[idx[b, j]]) for j in range(layer.k)))
    return torch.stack(out)


def layer(merge=True, gate_on="task", k=2, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = MEO(8, 6, num_experts=4, k=k, gate_on=gate_on, num_tasks=3 if gate_on == "task" else None,
            merge=merge, **kw).to(dtype)
    with torch.no_grad():
        m.gate.weight.normal_(0, 1.0)
        for e in m.experts.parameters():
            e.normal_(0, 0.5)
        if gate_on == "task":
            m.task_embedding.weight.normal_(0, 1.0)
    return m.eval()


def test_noisy_top_k_without_noise_is_hand_worked():
    clean = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    idx, w, load = noisy_top_k(clean, None, 2)
    assert idx.tolist() == [[1, 0], [2, 0]]
    e = math.e
    torch.testing.assert_close(w, torch.tensor([[e / (e + 1), 1 / (e + 1)], [e**3 / (e**3 + 1), 1 / (e**3 + 1)]]))
    assert load.tolist() == [2.0, 1.0, 1.0]


def test_noisy_load_is_the_probability_of_being_in_the_top_k_with_the_others_fixed():
    torch.manual_seed(1)
    B, E, k = 5, 6, 2
    clean = torch.randn(B, E, dtype=torch.float64)
    std = torch.rand(B, E, dtype=torch.float64) + 0.1
    _, _, load = noisy_top_k(clean, std, k, torch.Generator().manual_seed(7))
    noisy = clean + torch.randn(B, E, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * std
    want = torch.zeros(E, dtype=torch.float64)
    for b in range(B):
        for i in range(E):
            others = torch.cat([noisy[b, :i], noisy[b, i + 1:]])
            kth = others.sort(descending=True).values[k - 1]  # i is in the top k iff its logit beats this
            want[i] += 0.5 * (1 + math.erf(float(clean[b, i] - kth) / float(std[b, i]) / math.sqrt(2)))
    torch.testing.assert_close(load, want)


def test_cv_squared_and_the_balance_loss_are_hand_worked():
    assert float(cv_squared(torch.tensor([1.0, 3.0]))) == pytest.approx(2.0 / 4.0, rel=1e-6)  # var 2 (unbiased), mean 2
    m = layer(balance=0.5)
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[0, 0], m.gate.weight[1, 1] = 1.0, 0.5  # expert 0 and 1 lead for every task
        m.task_embedding.weight.fill_(2.0)
    m(torch.randn(2, 3, 8), torch.tensor([0, 1]))
    # logits [2, 1, 0, 0] for both sequences: top 2 = experts 0, 1 with weights softmax(2, 1)
    p = math.e / (math.e + 1)
    imp = torch.tensor([2 * p, 2 * (1 - p), 0.0, 0.0])
    load = torch.tensor([2.0, 2.0, 0.0, 0.0])
    cv = lambda v: float(v.var() / v.mean() ** 2)  # noqa: E731
    assert float(aux_loss(m).detach()) == pytest.approx(0.5 * (cv(imp) + cv(load)), rel=1e-5)


@pytest.mark.parametrize("merge", [True, False])
def test_outputs_and_gradients_equal_the_per_sequence_reference(merge):
    m = layer(merge=merge, dtype=torch.float64)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    tasks = torch.tensor([0, 2, 1])
    y = m(x, tasks)
    r = m.last_routing
    idx, w = r.expert.view(3, 2), r.weight.view(3, 2)
    torch.testing.assert_close(y, reference(m, x, idx, w))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, m.experts.gate_up_proj, m.experts.down_proj, m.gate.weight], g)
    m2 = layer(merge=merge, dtype=torch.float64)
    x2 = x.detach().clone().requires_grad_(True)
    s = m2.task_embedding(tasks)
    top, idx2 = (s @ m2.gate.weight.T).topk(2, dim=-1)
    ref = reference(m2, x2, idx2, torch.softmax(top, -1))
    want = torch.autograd.grad(ref, [x2, m2.experts.gate_up_proj, m2.experts.down_proj, m2.gate.weight], g)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b)


def test_gradcheck_in_float64():
    m = layer(dtype=torch.float64)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    tasks = torch.tensor([1, 2])
    names = ["experts.gate_up_proj", "experts.down_proj", "gate.weight", "task_embedding.weight"]
    params = dict(m.named_parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x, tasks))

    assert torch.autograd.gradcheck(f, (x, *[params[n].detach().clone().requires_grad_(True) for n in names]))


def test_merging_differs_from_mixing_for_swiglu_and_equals_it_for_one_expert():
    x = torch.randn(2, 4, 8)
    tasks = torch.tensor([0, 1])
    merged, mixed = layer(merge=True)(x, tasks), layer(merge=False)(x, tasks)
    assert (merged - mixed).abs().max() > 0.1 * mixed.abs().max()
    torch.testing.assert_close(layer(merge=True, k=1)(x, tasks), layer(merge=False, k=1)(x, tasks))


def test_token_attention_starts_as_identity_and_learns():
    x = torch.randn(2, 4, 8)
    tasks = torch.tensor([0, 1])
    a, b = layer(token_attention=True), layer()
    a.load_state_dict(b.state_dict(), strict=False)  # the same experts and gate; the bottleneck is a's own
    torch.testing.assert_close(a(x, tasks), b(x, tasks))
    a(x, tasks).sum().backward()
    assert a.token_attention[2].weight.grad.abs().sum() > 0


def test_noise_only_in_training_and_bad_task_ids_are_refused():
    m = layer()
    x = torch.randn(4, 3, 8)
    tasks = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(m(x, tasks), m(x, tasks))
    with torch.no_grad():
        m.noise.weight.fill_(3.0)
    m.train()
    torch.manual_seed(0)
    a = m(x, tasks)
    assert any(not torch.equal(a, m(x, tasks)) for _ in range(5))
    with pytest.raises(ValueError, match="task_ids must lie in"):
        m(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="pass task_ids"):
        m(x)
    with pytest.raises(ValueError, match="3 task_ids for a batch of 4"):
        m(x, torch.tensor([0, 1, 2]))


def test_mean_gating_sees_the_whole_sequence_and_a_gpt_refuses_it():
    m = layer(gate_on="mean")
    x = torch.randn(1, 6, 8)
    x2 = x.clone()
    x2[:, -1] += 5.0
    assert not torch.allclose(m(x)[:, 0], m(x2)[:, 0])  # position 0 depends on the last token
    cfg = GPTConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16,
                    ffn=[{"kind": "meo", "gate_on": "mean"}] * 2)
    with pytest.raises(ValueError, match="must gate on the task"):
        GPT(cfg)


def gpt():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16,
                    ffn=[{"kind": "dense"}, {"kind": "meo", "num_experts": 4, "k": 2, "num_tasks": 3, "d_ff": 12}])
    model = GPT(cfg).eval()
    with torch.no_grad():  # tasks that pick different experts, and experts that move the logits
        model.blocks[1].ffn.gate.weight.normal_()
        model.blocks[1].ffn.task_embedding.weight.normal_(0, 2.0)
        for p in model.blocks[1].ffn.experts.parameters():
            p.normal_(0, 0.5)
    return model


def test_a_task_level_gpt_is_causal_depends_on_the_task_and_round_trips(tmp_path):
    model = gpt()
    assert float(model.blocks[1].ffn.noise.weight.detach().abs().sum()) == 0  # the GPT's init leaves the gate's own
    ids = torch.randint(0, 32, (2, 10))
    tasks = torch.tensor([0, 2])
    out = model(ids, task_ids=tasks)
    later = ids.clone()
    later[:, 6:] = (later[:, 6:] + 1) % 32
    torch.testing.assert_close(model(later, task_ids=tasks)[:, :6], out[:, :6])
    assert not torch.allclose(model(ids, task_ids=torch.tensor([1, 1])), out)
    with pytest.raises(ValueError, match="pass task_ids"):
        model(ids)
    model.save(tmp_path / "m")
    torch.testing.assert_close(GPT.load(tmp_path / "m").eval()(ids, task_ids=tasks), out, rtol=0, atol=0)
    assert float(model.loss(ids, ids, task_ids=tasks)) > 0
    e = model.blocks[1].ffn.expert_params()
    assert model.active_params() == model.num_params() - e + e // 2


def test_generate_with_a_cache_equals_the_greedy_loop_without_one():
    model = gpt()
    ids = torch.randint(0, 32, (2, 4))
    tasks = torch.tensor([1, 0])
    out = model.generate(ids, 5, task_ids=tasks)
    assert not torch.equal(out, model.generate(ids, 5, task_ids=1 - tasks))  # the task steers every step
    seq = ids
    for _ in range(5):
        seq = torch.cat([seq, model(seq, task_ids=tasks)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_experts_start_as_copies_of_one_ffn_and_the_task_embedding_at_unit_scale():
    cfg = GPTConfig(vocab_size=32, d_model=64, n_layers=1, n_heads=2, d_ff=24, max_seq_len=16,
                    ffn=[{"kind": "meo", "num_experts": 4, "k": 2, "num_tasks": 3}])
    ffn = GPT(cfg).blocks[0].ffn
    for p in ffn.experts.parameters():
        assert all(torch.equal(p[0], p[e]) for e in range(1, 4))  # a merge of copies is the copy: exact at start
    assert 0.7 < float(ffn.task_embedding.weight.std()) < 1.3
    apart = GPT(GPTConfig(**{**cfg.to_dict(), "ffn": [{**cfg.ffn[0], "copies": False}]})).blocks[0].ffn
    assert not torch.equal(apart.experts.down_proj[0], apart.experts.down_proj[1])
