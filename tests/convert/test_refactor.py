"""Read-ME: PreGate (causal, KV cache), refactoring by domain masks, distillation, tuning, save/load.

The equations are pinned against oracles written in the tests from papers.md §2.2-2.5 (never by
calling the code under test for the expected values): channel importance and masks on hand-made
activations, the graded-rank targets and the distillation loss on hand-worked examples, the sum
over layers, the learning-rate schedule. The PreGate's forward has its own oracle (test_pregate.py).
"""

import math

import pytest
import torch

from moekit import MoE
from moekit.convert import load, refactor, save, tune
from moekit.convert.refactor import distillation_loss, distillation_targets, domain_masks, router_loss
from moekit.models import GPT, GPTConfig
from moekit.models.pregate import PreGate
from moekit.routers import PreGated


def _dense(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, d_ff=64)).eval()


def _domains():
    g = torch.Generator().manual_seed(1)
    return {"low": torch.randint(0, 50, (16, 40), generator=g), "high": torch.randint(50, 100, (16, 40), generator=g)}


def test_pregate_is_causal_and_its_kv_cache_matches_the_full_forward():
    torch.manual_seed(0)
    pg = PreGate(50, 3, d_model=16, n_heads=2, max_seq_len=32).eval()
    ids = torch.randint(0, 50, (2, 12))
    full = pg(ids)
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    torch.testing.assert_close(pg(changed)[:, :8], full[:, :8])  # the future never changes the past
    cache = {}
    steps = [pg(ids[:, :5], cache)] + [pg(ids[:, t : t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert pg.route(ids).shape == (2, 12)


def test_pregate_embedding_starts_from_the_lm_embedding():
    pg = PreGate(10, 2, d_model=8, n_heads=2)
    lm = torch.randn(12, 16)
    pg.init_embedding(lm)
    torch.testing.assert_close(pg.embed.weight, lm[:10, :8])


def test_domain_masks_residual_plus_specific_experts_of_equal_width():
    imp = [torch.tensor([9.0, 8, 7, 1, 2, 0, 0, 0]), torch.tensor([9.0, 0, 0, 8, 7, 1, 2, 0])]
    residual, groups = domain_masks(imp, keep=0.5)  # each domain keeps 4 of 8
    # top-4: {0, 1, 2, 4} and {0, 3, 4, 6}; residual = their intersection, experts = the rest of each
    assert residual.tolist() == [0, 4]
    assert groups.tolist() == [[1, 2], [3, 6]]
    with pytest.raises(ValueError, match="same channels"):
        domain_masks([imp[0], imp[0]], keep=0.5)


# Hand-made down-projection inputs h (one row per token id) for the two layers of an 8-channel FFN.
# Domain "a" reads ids 0 and 1 equally often, domain "b" ids 2 and 3. Layer 0, per channel:
#   a: mean|h| = [4, 3, 6, .5, 0, 2.5, 0, 2.25]  -> top-4 {2, 0, 1, 5}
#      (max|h| would pick {2, 5, 7, 0}, the signed mean {0, 1, 5, 7}, the bottom-4 {4, 6, 3, 7})
#   b: mean|h| = [5, .5, 7, 2, 0, 0, 3, 1]        -> top-4 {2, 0, 6, 3}  (signed mean: {0, 6, 3, 7})
#   residual = {0, 2} (kept by both), expert a = {1, 5}, expert b = {3, 6}.
# Layer 1 permutes the channels, so every layer gets its own masks.
_H0 = torch.tensor([[4.0, 3, -6, 0, 0, 5, 0, 0],
                    [4.0, 3, -6, 1, 0, 0, 0, 4.5],
                    [5.0, 0.5, -7, 2, 0, 0, 3, 1],
                    [5.0, 0.5, -7, 2, 0, 0, 3, 1]])
_PERM = [3, 7, 0, 5, 1, 6, 2, 4]
_H = [_H0, _H0[:, _PERM]]


def _oracle_masks(rows_a, rows_b, keep):
    """papers.md §2.2: importance = mean |h| per domain, top-`keep` channels, residual = intersection."""
    F_ = len(rows_a[0])
    n = round(keep * F_)
    tops = []
    for rows in (rows_a, rows_b):
        imp = [sum(abs(r[c]) for r in rows) / len(rows) for c in range(F_)]
        tops.append(set(sorted(range(F_), key=lambda c: -imp[c])[:n]))
    residual = tops[0] & tops[1]
    return residual, [t - residual for t in tops]


def test_refactor_masks_follow_the_importance_of_hand_made_activations():
    torch.manual_seed(0)
    dense = GPT(GPTConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2, max_seq_len=16, d_ff=8)).eval()
    with torch.no_grad():  # label every dense channel c by its down-projection column: down[0, c] = c
        for blk in dense.blocks:
            blk.ffn.down_proj.weight[0] = torch.arange(8.0)

    def run(model, batch):  # feed the hand-made h of each token straight into every down projection
        for layer, blk in enumerate(model.blocks):
            blk.ffn.down_proj(_H[layer][batch.reshape(-1)])

    domains = {"a": torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]]), "b": torch.tensor([[2, 3, 2, 3], [3, 2, 3, 2]])}
    model = refactor(dense, domains, keep=0.5, pregate={"d_model": 8, "n_heads": 2}, run=run, min_tokens=1)
    want = [({0, 2}, [{1, 5}, {3, 6}])]  # layer 0, worked out by hand above
    want.append(_oracle_masks(_H[1][:2].tolist(), _H[1][2:].tolist(), 0.5))
    assert want[0] == _oracle_masks(_H[0][:2].tolist(), _H[0][2:].tolist(), 0.5)
    for layer, blk in enumerate(model.blocks):
        moe = blk.ffn
        residual = {int(c) for c in moe.shared_expert.down_proj.weight[0].round()}
        experts = [{int(c) for c in moe.experts.down_proj[e, 0].round()} for e in range(2)]
        assert (residual, experts) == want[layer], layer
        assert moe.d_ff == 2 and moe.shared_expert.up_proj.out_features == 2  # 4 of 8 per domain


def test_refactored_layer_equals_the_dense_ffn_masked_to_the_domain_channels():
    dense = _dense()
    model = refactor(dense, _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2})
    x = torch.randn(7, 32)
    for db, mb in zip(dense.blocks, model.blocks):
        moe = mb.ffn
        assert isinstance(moe, MoE) and isinstance(moe.gate, PreGated)
        ffn = db.ffn
        h = torch.nn.functional.silu(ffn.gate_proj(x)) * ffn.up_proj(x)  # the dense hidden activation
        for e in range(moe.num_experts):
            # which dense channels expert e (+ the residual) holds: match rows of the up projection
            rows = torch.cat([moe.shared_expert.up_proj.weight, moe.experts.gate_up_proj[e, moe.d_ff :]])
            ch = [int((ffn.up_proj.weight == r).all(1).nonzero()) for r in rows]
            mask = torch.zeros(64)
            mask[ch] = 1
            want = torch.nn.functional.linear(h * mask, ffn.down_proj.weight)
            got = moe(x, expert_ids=torch.full((7,), e))
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            assert len(ch) == 32  # keep=0.5 of 64 channels per token


def _relu_moe(residual_rows, expert_rows):
    """An MoE over one-hot tokens whose |hidden| is given: token j's channel c holds ``rows[c][j]``
    (non-negative, ReLU experts), residual first."""
    E, w, T = len(expert_rows), len(expert_rows[0]), len(residual_rows[0])
    moe = MoE(T, w, E, router=PreGated(), activation="relu", shared_d_ff=len(residual_rows), check_finite=False)
    with torch.no_grad():
        moe.experts.up_proj.copy_(torch.tensor(expert_rows))
        moe.shared_expert.up_proj.weight.copy_(torch.tensor(residual_rows))
    return moe, torch.eye(T)


def test_distillation_targets_hand_worked():
    """papers.md §2.4 with N = 5 (the width of an expert): cut-offs at ranks 4, 4, 3, 2, 1, so the
    token's largest channel scores 5/15, the 2nd 4/15, the 3rd 3/15, the 4th 2/15, the rest 0. An
    expert sums its channels (the residual's are not counted), then 10 * (dist - mean of all)."""
    # token 0: ranks 1st residual, 2nd expert 1, 3rd expert 0, 4th expert 1 -> dist = [3, 4 + 2] / 15
    # token 1: ranks 1st, 2nd expert 0, 3rd expert 1, 4th residual           -> dist = [5 + 4, 3] / 15
    residual = [[10.0, 0.1], [0.05, 5.0]]
    e0 = [[7.0, 8.0], [0.2, 9.0], [0.3, 0.1], [0.4, 0.2], [0.5, 0.3]]
    e1 = [[9.0, 7.0], [6.0, 0.4], [0.6, 0.5], [0.7, 0.6], [0.01, 0.7]]
    moe, x = _relu_moe(residual, [e0, e1])
    # mean of [3, 6, 9, 3] / 15 = 0.35: 10 * ([0.2, 0.4, 0.6, 0.2] - 0.35)
    want = torch.tensor([[-1.5, 0.5], [2.5, -1.5]])
    torch.testing.assert_close(distillation_targets(moe, x), want, atol=1e-6, rtol=0)


def _oracle_loss(logits, dist, smoothing=0.5, hard_w=0.75, soft_w=0.25):
    """0.75 * CE(label smoothing 0.5, argmax target) + 0.25 * CE(softmax(target)), means over tokens."""
    hard = soft = 0.0
    for lg, d in zip(logits.tolist(), dist.tolist()):
        lse = math.log(sum(math.exp(v) for v in lg))
        logp = [v - lse for v in lg]
        y = max(range(len(d)), key=lambda j: d[j])
        hard += -(1 - smoothing) * logp[y] - smoothing * sum(logp) / len(logp)
        z = sum(math.exp(v) for v in d)
        soft += -sum(math.exp(v) / z * lp for v, lp in zip(d, logp))
    return (hard_w * hard + soft_w * soft) / len(logits)


def test_distillation_loss_hand_computed():
    # one token, two experts: p = softmax(logits) = [3/4, 1/4], target dist = [0, ln 9] -> label 1,
    # soft target [0.1, 0.9]. Smoothed hard target [0.25, 0.75]:
    #   hard = 0.75 ln 4 + 0.25 ln(4/3), soft = 0.9 ln 4 + 0.1 ln(4/3)
    #   loss = 0.75 hard + 0.25 soft = 0.7875 ln 4 + 0.2125 ln(4/3)
    logits = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    dist = torch.tensor([[0.0, math.log(9.0)]])
    loss = distillation_loss(logits, dist)
    assert float(loss.detach()) == pytest.approx(0.7875 * math.log(4) + 0.2125 * math.log(4 / 3), abs=1e-6)
    loss.backward()  # d/dlogits = 0.75 (p - [.25, .75]) + 0.25 (p - [.1, .9]) = [0.5375, -0.5375]
    torch.testing.assert_close(logits.grad, torch.tensor([[0.5375, -0.5375]]), atol=1e-6, rtol=0)
    # several tokens and experts: the mean over tokens of the same formula
    g = torch.Generator().manual_seed(3)
    logits, dist = 2 * torch.randn(5, 4, generator=g), 3 * torch.randn(5, 4, generator=g)
    assert float(distillation_loss(logits, dist)) == pytest.approx(_oracle_loss(logits, dist), abs=1e-5)
    for wrong in (dict(smoothing=0.1), dict(hard_w=0.25, soft_w=0.75)):  # the example tells them apart
        assert abs(_oracle_loss(logits, dist, **wrong) - _oracle_loss(logits, dist)) > 1e-3


def test_router_loss_sums_the_layers_and_agreement_is_top1_match():
    model = refactor(_dense(), _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2})
    ids = torch.randint(0, 100, (3, 10))
    moes = [b.ffn for b in model.blocks]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, m in enumerate(moes)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    logits = model.pregate(ids).reshape(-1, 2).detach()
    targets = [distillation_targets(m, inputs[i].reshape(-1, 32)) for i, m in enumerate(moes)]
    per_layer = [_oracle_loss(logits, t) for t in targets]
    loss, agree = router_loss(model, ids)
    assert float(loss.detach()) == pytest.approx(sum(per_layer), abs=1e-5)  # summed over layers, not averaged
    assert sum(per_layer) / 2 != pytest.approx(sum(per_layer), abs=1e-3)  # the mean would be told apart
    want = sum(float((logits.argmax(-1) == t.argmax(-1)).float().mean()) for t in targets) / len(targets)
    assert agree == pytest.approx(want, abs=1e-9)


def _oracle_lr(i, steps, lr):
    """Ours (papers.md §2.5 gives only "cosine decay within a round"): linear warm-up over
    max(1, steps // 10) steps, then cosine from lr down to a floor of 0.1 lr."""
    warm = max(1, steps // 10)
    if i < warm:
        return lr * (i + 1) / warm
    t = min(1.0, (i - warm) / max(1, steps - warm))
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def test_tune_schedule_learning_rates_and_frozen_parts():
    model = refactor(_dense(), _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2})
    ids = torch.randint(0, 100, (8, 24))
    before, _ = router_loss(model, ids)
    hist = tune(model, lambda s: (ids, ids.roll(-1, 1)), rounds=2, router_steps=12, expert_steps=3, router_lr=3e-2,
                expert_lr=1e-3, progress=False)
    assert [h["phase"] for h in hist] == (["router"] * 12 + ["experts"] * 3) * 2
    assert [h["step"] for h in hist] == list(range(30))
    # Read-ME: learning rates times 0.8 per round, cosine within a round (our warm-up and floor)
    want = [_oracle_lr(i, n, lr * 0.8**r) for r in range(2) for n, lr in ((12, 3e-2), (3, 1e-3)) for i in range(n)]
    assert [h["lr"] for h in hist] == pytest.approx(want, rel=1e-12)
    assert hist[12 + 3]["lr"] == pytest.approx(0.8 * 3e-2 / 1, rel=1e-12)  # round 2 starts at 0.8 x (warm-up 1)
    after, _ = router_loss(model, ids)
    assert float(after.detach()) < float(before.detach())
    assert all(p.requires_grad for p in model.parameters())


def test_tune_router_rounds_freeze_the_backbone_and_expert_rounds_the_router():
    model = refactor(_dense(), _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2})
    ids = torch.randint(0, 100, (4, 16))
    gate = {id(p) for p in model.pregate.parameters()}

    def snapshot():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(a, b, in_gate):
        return {n for n, p in model.named_parameters() if (id(p) in gate) == in_gate and not torch.equal(a[n], b[n])}

    s0 = snapshot()
    tune(model, lambda s: (ids, ids.roll(-1, 1)), rounds=1, router_steps=3, expert_steps=0, router_lr=1e-2,
         progress=False)
    s1 = snapshot()
    assert changed(s0, s1, in_gate=False) == set()  # the backbone is bit for bit the same
    assert changed(s0, s1, in_gate=True) == {n for n, p in model.named_parameters() if id(p) in gate}
    tune(model, lambda s: (ids, ids.roll(-1, 1)), rounds=1, router_steps=0, expert_steps=3, expert_lr=1e-2,
         progress=False)
    s2 = snapshot()
    assert changed(s1, s2, in_gate=True) == set()  # the router is not trained by the LM loss
    assert {n.split(".")[-1] for n in changed(s1, s2, in_gate=False)} >= {"gate_up_proj", "down_proj"}


def test_refactored_gpt_saves_loads_and_generates_incrementally(tmp_path):
    model = refactor(_dense(), _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2}).eval()
    assert model.config.pregate["num_experts"] == 2 and model.config.extra["convert"]["method"] == "refactor"
    ids = torch.randint(0, 100, (2, 20))
    save(model, tmp_path / "m")
    again = load(tmp_path / "m")
    torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)
    caches = [{} for _ in model.blocks]
    steps = torch.cat([model(ids[:, :6], caches)] + [model(ids[:, t : t + 1], caches) for t in range(6, 20)], 1)
    torch.testing.assert_close(steps, model(ids), atol=1e-5, rtol=1e-5)


def test_refactored_hf_model_routes_whole_sequences_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    model = refactor(dense, _domains(), keep=0.5, pregate={"d_model": 16, "n_heads": 2}).eval()
    ids = torch.randint(0, 100, (2, 12))
    out = model(input_ids=ids).logits
    save(model, tmp_path / "hf")
    torch.testing.assert_close(load(tmp_path / "hf")(input_ids=ids).logits, out, atol=0, rtol=0)
    hist = tune(model, lambda s: (ids, ids), rounds=1, router_steps=2, expert_steps=2,
                lm_loss=lambda m, x, y: m(input_ids=x, labels=x).loss, progress=False)
    assert len(hist) == 4
    with pytest.raises(ValueError, match="whole sequences"):
        model(input_ids=ids[:, -1:], past_key_values=model(input_ids=ids, use_cache=True).past_key_values)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 domain"):
        refactor(_dense(), {"one": torch.randint(0, 100, (16, 40))})
    with pytest.raises(ValueError, match="keep must lie in"):
        refactor(_dense(), _domains(), keep=1.0)
    with pytest.raises(ValueError, match="calibration text too small"):
        refactor(_dense(), {"a": torch.randint(0, 100, (1, 8)), "b": torch.randint(0, 100, (1, 8))})
    moe = MoE(8, 4, 2, router=PreGated(), check_finite=False)
    with pytest.raises(ValueError, match="needs expert_ids"):
        moe(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 2\)"):
        moe(torch.randn(3, 8), expert_ids=torch.tensor([0, 1, 2]))
    cfg = GPTConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, d_ff=32).with_moe(
        num_experts=2, k=1, router="pregate", router_args={})
    with pytest.raises(ValueError, match="has no PreGate"):
        GPT(cfg)(torch.randint(0, 50, (1, 4)))
