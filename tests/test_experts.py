"""Expert backends: grouped_mm and the segment loop agree, the automatic choice, reduced precision."""

import pytest
import torch

from moekit import MoE, Routing


def test_backends_agree_and_auto_selection():
    x = torch.randn(50, 16)
    a = MoE(16, 32, 8, backend="loop")
    b = MoE(16, 32, 8, backend="grouped_mm")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    # widths that break grouped_mm's 16-byte alignment fall back to the loop by themselves
    odd = MoE(6, 10, 4)
    assert odd(torch.randn(5, 6)).shape == (5, 6)
    with pytest.raises(ValueError, match="grouped_mm"):
        MoE(6, 10, 4, backend="grouped_mm")(torch.randn(5, 6))


def test_bf16_grouped_mm_close_to_fp32():
    moe = MoE(32, 64, 4, backend="grouped_mm")
    x = torch.randn(40, 32)
    y32 = moe(x)
    r = moe.last_routing
    y16 = moe.to(torch.bfloat16)(x.bfloat16(), routing=Routing(r.token, r.expert, r.weight.detach(), r.num_tokens, r.num_experts))
    torch.testing.assert_close(y16.float(), y32, atol=3e-2, rtol=3e-2)
