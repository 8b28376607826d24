"""Expert backends: grouped_mm and the segment loop agree, the automatic choice, reduced precision, and
the grouped GEMM op torch.compile runs against per-group matmuls."""

import pytest
import torch

from moekit import MoE, Routing
from moekit.experts import grouped_mm


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


@pytest.mark.parametrize("transpose_w", [True, False])
def test_grouped_mm_custom_op_matches_a_loop_over_groups(transpose_w):
    """moekit::grouped_mm (what torch.compile runs) against per-group matmuls: output, input and weight
    gradients, an empty group included; then torch's own consistency checks of the op (fake, autograd)."""
    counts, d_in, d_out = [3, 0, 5, 2], 8, 16
    x = torch.randn(sum(counts), d_in, requires_grad=True)
    w = torch.randn(len(counts), d_out, d_in) if transpose_w else torch.randn(len(counts), d_in, d_out)
    w.requires_grad_(True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y = grouped_mm(x, w, offs, transpose_w)
    starts = [sum(counts[:g]) for g in range(len(counts))]
    y_ref = torch.cat([x[s:s + n] @ (w[g].t() if transpose_w else w[g]) for g, (s, n) in enumerate(zip(starts, counts))])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    got, want = torch.autograd.grad(y, [x, w], g), torch.autograd.grad(y_ref, [x, w], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1][1], torch.zeros_like(w[1]))  # the empty group's weight
    torch.library.opcheck(grouped_mm, (x, w, offs, transpose_w))
