"""DSMoE-style partitioning: cut a dense FFN's intermediate dimension into experts.

``FFN(x) = sum_i (act(x W_i) * x U_i) V_i`` over contiguous blocks ``i`` of the intermediate
dimension (papers.md §4.2), so an MoE whose experts are the blocks, with every expert on at
weight 1, computes exactly the dense FFN.
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import GroupedExperts
from ..layer import FFN, MoE
from ..routing import Router


def partition_ffn(ffn: FFN, num_experts: int) -> GroupedExperts:
    """``GroupedExperts`` holding the ``num_experts`` contiguous blocks of ``ffn``'s hidden units."""
    if not isinstance(ffn, FFN):
        raise TypeError(f"partition_ffn: expected a moekit FFN, got {type(ffn).__name__}")
    F = ffn.down_proj.in_features
    if num_experts < 1 or F % num_experts:
        valid = [e for e in range(1, min(F, 64) + 1) if F % e == 0]
        raise ValueError(f"partition_ffn: num_experts={num_experts} does not divide d_ff={F}; valid counts: {valid}")
    if any(m.bias is not None for m in ffn.modules() if isinstance(m, nn.Linear)):
        raise ValueError("partition_ffn: FFNs with biases are not supported yet")
    E, f, d = num_experts, F // num_experts, ffn.down_proj.out_features
    experts = GroupedExperts(E, d, f, ffn.activation).to(ffn.down_proj.weight.dtype)
    with torch.no_grad():
        up = ffn.up_proj.weight.view(E, f, d)
        if ffn.act.gated:
            experts.gate_up_proj.copy_(torch.cat([ffn.gate_proj.weight.view(E, f, d), up], dim=1))
        else:
            experts.up_proj.copy_(up)
        experts.down_proj.copy_(ffn.down_proj.weight.view(d, E, f).permute(1, 0, 2))
    return experts


def moe_from_ffn(ffn: FFN, num_experts: int, router: Router | str) -> MoE:
    """An MoE whose experts are the blocks of ``ffn`` (a fresh router decides which run)."""
    experts = partition_ffn(ffn, num_experts)
    moe = MoE(experts.d_model, experts.d_ff, num_experts, router=router, activation=ffn.activation,
              check_finite=False).to(ffn.down_proj.weight.dtype)
    moe.experts.load_state_dict(experts.state_dict())
    return moe


def partition_gpt(model, num_experts: int, router: str, router_args: dict | None = None):
    """A copy of a dense ``moekit.models.GPT`` whose every FFN is cut into ``num_experts`` blocks."""
    from ..models import GPT

    cfg = model.config
    d_ff = cfg.d_ff
    if d_ff % num_experts:
        valid = [e for e in range(1, min(d_ff, 64) + 1) if d_ff % e == 0]
        raise ValueError(f"partition_gpt: num_experts={num_experts} does not divide d_ff={d_ff}; valid counts: {valid}")
    if any(not isinstance(b.ffn, FFN) for b in model.blocks):
        raise ValueError("partition_gpt: every layer of the model must have a dense FFN")
    new = GPT(cfg.with_moe(num_experts=num_experts, d_ff=d_ff // num_experts, router=router,
                           router_args=router_args or {}))
    state = {k: v for k, v in model.state_dict().items() if ".ffn." not in k}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(".ffn." in k for k in missing)
    for old_block, new_block in zip(model.blocks, new.blocks):
        new_block.ffn.experts.load_state_dict(partition_ffn(old_block.ffn, num_experts).state_dict())
    return new
