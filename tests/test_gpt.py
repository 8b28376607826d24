import pytest
import torch

from moekit import MoE
from moekit.models import GPT, GPTConfig
from moekit.routers import TopK, register_router

CFG = GPTConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, d_ff=64)


@register_router("test_importance_topk")
class ImportanceTopK(TopK):
    """TopK that insists on the attention importance (exercises the explicit-attention path)."""

    context_keys = ("importance",)

    def forward(self, x, importance=None, **context):
        assert importance is not None and importance.shape == (x.shape[0],)
        self.seen = importance
        return super().forward(x)


CONFIGS = {
    "dense": CFG,
    "moe": CFG.with_moe(4, 2),
    "moe-importance": CFG.with_moe(4, 2, router="test_importance_topk"),
    "moe-dynamic-k": CFG.with_moe(4, 2, router="dynamic_k", router_args={"k_min": 1, "k_max": 3}),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_causality(kind):
    torch.manual_seed(0)
    model = GPT(CONFIGS[kind]).eval()
    ids = torch.randint(0, 97, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_importance_path_matches_sdpa_and_is_causally_normalised():
    torch.manual_seed(0)
    plain = GPT(CONFIGS["moe"]).eval()
    imp = GPT(CONFIGS["moe-importance"]).eval()
    imp.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (3, 16))
    torch.testing.assert_close(imp(ids), plain(ids), atol=1e-5, rtol=1e-5)
    seen = imp.blocks[0].ffn.gate.seen.view(3, 16)
    assert torch.all(seen > 0) and torch.all(seen <= torch.arange(1, 17))
    assert torch.allclose(seen[:, 0], torch.ones(3))  # the first token can only attend to itself
    # the same importance for the new tokens when decoding with a KV cache
    caches = [{} for _ in imp.blocks]
    imp(ids[:, :10], caches)
    imp(ids[:, 10:], caches)
    torch.testing.assert_close(imp.blocks[0].ffn.gate.seen.view(3, 6), seen[:, 10:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_generate_with_kv_cache_equals_full_forward(kind):
    torch.manual_seed(0)
    model = GPT(CONFIGS[kind]).eval()
    prompt = torch.randint(0, 97, (2, 6))
    out = model.generate(prompt, 10)
    full = model(out[:, :-1]).argmax(-1)
    assert torch.equal(out[:, 6:], full[:, 5:])


def test_save_load_round_trip_and_config_mismatch(tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIGS["moe"])
    model.save(tmp_path / "m")
    loaded = GPT.load(tmp_path / "m")
    ids = torch.randint(0, 97, (1, 10))
    torch.testing.assert_close(loaded(ids), model(ids))
    assert isinstance(loaded.blocks[0].ffn, MoE)
    other = GPT(CFG)
    with pytest.raises(ValueError, match=r"checkpoint config differs.*ffn: checkpoint="):
        other.load_weights(tmp_path / "m")
    wider = GPT(GPTConfig(**{**CFG.to_dict(), "d_model": 64}))
    with pytest.raises(ValueError, match=r"d_model: checkpoint=32 model=64"):
        wider.load_weights(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        GPT.load(tmp_path / "nowhere")


def test_token_ids_outside_vocabulary_are_rejected():
    model = GPT(CFG)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\).*tokenizer"):
        model(torch.tensor([[1, 2, 500]]))


def test_bad_config():
    with pytest.raises(ValueError, match="n_heads=3"):
        GPTConfig(d_model=32, n_heads=3)
    with pytest.raises(ValueError, match="unknown kind 'conv'"):
        GPT(GPTConfig(**{**CFG.to_dict(), "ffn": [{"kind": "conv"}, {"kind": "dense"}]}))


def test_active_params_count_k_of_e_experts():
    dense, moe = GPT(CFG), GPT(CONFIGS["moe"])
    router_params = sum(b.ffn.gate.weight.numel() for b in moe.blocks)
    assert moe.active_params() == dense.num_params() + router_params
    assert moe.num_params() > moe.active_params()
