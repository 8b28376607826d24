"""Shared by the offload tests: a small MoE GPT, a MoE layer with biases, batch-1 decoding, a recorded
access stream."""

import copy

import torch

from moekit import MoE
from moekit.models import GPT, GPTConfig
from moekit.offload import record_trace

CFG = GPTConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=2, max_seq_len=64, d_ff=64)


def moe_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(CFG.with_moe(num_experts=kw.pop("num_experts", 8), k=kw.pop("k", 2), **kw)).eval()


def biased_moe(d_ff: int) -> MoE:
    """A MoE layer (D = 16, 4 experts, GELU) whose experts have random biases, in eval mode."""
    torch.manual_seed(0)
    moe = MoE(16, d_ff, 4, "topk", activation="gelu", bias=True).eval()
    with torch.no_grad():
        for b in (moe.experts.up_proj_bias, moe.experts.down_proj_bias):
            b.normal_()
    return moe


def decode(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` decoded token by token (batch-1 decoding's access stream)."""
    caches = [{} for _ in model.blocks]
    with torch.no_grad():
        return torch.cat([model(ids[:, t: t + 1], caches) for t in range(ids.shape[1])], 1)


def traced(served, tokens: int):
    """``(model, store, reference copy, ids, accesses, token of each access)`` for ``tokens`` random ids."""
    model, store = served
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, tokens))
    trace = record_trace(ref, ids)
    return model, store, ref, ids, trace, trace.accesses(), trace.token.tolist()
