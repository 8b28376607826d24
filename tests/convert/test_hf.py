"""Hugging Face's own MoE blocks as a second, independent oracle for the top-k layer."""

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
)
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moekit
from moekit.convert import from_hf, patch_hf_model, to_hf, unpatch_hf_model
from moekit.routers import TopK

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, eos_token_id=0, pad_token_id=0, bos_token_id=0)


def _configs():
    return {
        "mixtral": MixtralConfig(**SMALL, num_local_experts=6, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(**SMALL, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48,
                                    shared_expert_intermediate_size=40, norm_topk_prob=False),
        "qwen3_moe": Qwen3MoeConfig(**SMALL, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=48,
                                    head_dim=8, norm_topk_prob=True),
        "olmoe": OlmoeConfig(**SMALL, num_experts=6, num_experts_per_tok=2),
    }


BLOCKS = {
    "mixtral": MixtralSparseMoeBlock,
    "qwen2_moe": Qwen2MoeSparseMoeBlock,
    "qwen3_moe": Qwen3MoeSparseMoeBlock,
    "olmoe": OlmoeSparseMoeBlock,
}


def _block(kind):
    block = BLOCKS[kind](_configs()[kind])
    with torch.no_grad():
        for p in block.parameters():  # HF leaves 3D expert weights uninitialised outside a model
            p.normal_(0, 0.2)
    return block


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_equivalence_outputs_logits_and_grads(kind):
    block = _block(kind)
    moe = from_hf(block, balance=0.0, z_loss=0.0)
    x = torch.randn(3, 7, 32, requires_grad=True)
    y_hf = block(x)
    y = moe(x)
    assert (y - y_hf).abs().max() <= 1e-5
    logits_hf = block.gate(x.reshape(-1, 32))[0]
    torch.testing.assert_close(moe.last_routing.logits, logits_hf, atol=0, rtol=0)
    g = torch.randn_like(y)
    hf_params = dict(block.named_parameters())
    assert set(hf_params) == {n for n, _ in moe.named_parameters()}  # the same parameter names
    names = [n for n, _ in moe.named_parameters()]
    grads_hf = torch.autograd.grad(y_hf, [x, *(hf_params[n] for n in names)], g)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    for name, a, b in zip(["x", *names], grads, grads_hf):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_to_hf_round_trip(kind):
    block = _block(kind)
    moe = from_hf(block)
    with torch.no_grad():
        moe.experts.down_proj.mul_(1.5)  # change the layer, then export it
    back = to_hf(moe, like=block)
    assert type(back) is type(block) and back is not block
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(back(x), moe(x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(block.experts.down_proj, back.experts.down_proj)  # the template is untouched


def test_from_hf_copies_unless_told_to_share():
    block = _block("olmoe")
    copied, shared = from_hf(block), from_hf(block, copy_weights=False)
    assert copied.experts.down_proj.data_ptr() != block.experts.down_proj.data_ptr()
    assert shared.experts.down_proj.data_ptr() == block.experts.down_proj.data_ptr()


def test_to_hf_shape_mismatch_is_named():
    block = _block("mixtral")
    with pytest.raises(ValueError, match=r"k: layer=3 block=2"):
        to_hf(moekit.MoE(32, 64, 6, router=TopK(3)), like=block)
    with pytest.raises(ValueError, match=r"num_experts: layer=4 block=6"):
        to_hf(moekit.MoE(32, 64, 4, router=TopK(2)), like=block)


@pytest.mark.parametrize("router", [TopK(2, scale=2.0), TopK(2, capacity_factor=1.0), "softmax"])
def test_to_hf_refuses_routing_a_transformers_block_does_not_do(router):
    """Scaled weights or dropped tokens would be lost in the block: refused, not copied."""
    with pytest.raises(ValueError, match=r"^to_hf: transformers blocks route with plain top-k"):
        to_hf(moekit.MoE(32, 64, 6, router=router), like=_block("mixtral"))


MODELS = {
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "olmoe": OlmoeForCausalLM,
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_patch_hf_model_logits_training_and_save_load(kind, tmp_path):
    torch.manual_seed(0)
    model = MODELS[kind](_configs()[kind]).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    patch_hf_model(model)
    layers = [m for m in model.modules() if isinstance(m, moekit.MoE)]
    assert len(layers) == 2
    with torch.no_grad():  # same math; transformers' summation order may differ in the last bit
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-6, rtol=1e-5)

    # trains with moekit.aux_loss
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids)
        aux = moekit.aux_loss(model)
        assert aux.requires_grad and float(aux.detach()) > 0
        opt.zero_grad()
        (out.loss + aux).backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    assert layers[0].gate.weight.grad is not None
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits

    # a patched model's save_pretrained loads back into plain transformers
    model.save_pretrained(tmp_path / "patched")
    plain = MODELS[kind].from_pretrained(tmp_path / "patched").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, trained, atol=1e-5, rtol=1e-5)

    # and after unpatching, the model is a plain transformers model again
    unpatch_hf_model(model)
    assert not any(isinstance(m, moekit.MoE) for m in model.modules())
    model.save_pretrained(tmp_path / "unpatched")
    again = MODELS[kind].from_pretrained(tmp_path / "unpatched").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, trained, atol=1e-5, rtol=1e-5)


def test_patch_model_without_moe_blocks_is_an_error():
    with pytest.raises(ValueError, match="no supported MoE block"):
        patch_hf_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
