"""The local dispatcher against hand-worked values: rows sorted by expert (ties in token order),
segment bounds, and the weighted combine with its gradients."""

import torch

from moekit import LocalDispatcher, Routing, Segments


def _routing():
    # token 0 -> experts 2 (w .5) and 0 (w .25); token 1 -> 2 (w 1); token 2 -> 0 (w 2); expert 1 unused
    return Routing(token=torch.tensor([0, 0, 1, 2]), expert=torch.tensor([2, 0, 2, 0]),
                   weight=torch.tensor([0.5, 0.25, 1.0, 2.0], dtype=torch.float64), num_tokens=3, num_experts=3)


def test_dispatch_sorts_rows_by_expert_keeping_token_order():
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]], dtype=torch.float64)
    x_ND, seg, ctx = LocalDispatcher().dispatch(x, _routing())
    assert x_ND.tolist() == [[1.0, 10.0], [3.0, 30.0], [1.0, 10.0], [2.0, 20.0]]  # expert 0: tokens 0, 2; expert 2: 0, 1
    assert seg.sizes == [2, 0, 2] and seg.ends.tolist() == [2, 2, 4] and seg.ends.dtype == torch.int32
    assert seg.expert_of_row().tolist() == [0, 0, 2, 2] and seg.num_rows == 4
    assert seg.expert_of_row(num_rows=4).tolist() == [0, 0, 2, 2]  # with N given: no host read of the counts
    assert ctx.token_N.tolist() == [0, 2, 0, 1] and ctx.weight_N.tolist() == [0.25, 2.0, 0.5, 1.0]
    assert Segments.from_counts(torch.tensor([0, 3])).ends.tolist() == [0, 3]


def test_combine_is_the_weighted_sum_per_token_with_its_gradients():
    d = LocalDispatcher()
    r = _routing()
    r.weight.requires_grad_(True)
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]], dtype=torch.float64, requires_grad=True)
    x_ND, _, ctx = d.dispatch(x, r)
    y = d.combine(x_ND * torch.tensor([[1.0], [1.0], [-1.0], [-1.0]], dtype=torch.float64), ctx)
    # token 0: .25 * x0 - .5 * x0 = -.25 x0; token 1: -1 * x1; token 2: 2 * x2
    assert y.tolist() == [[-0.25, -2.5], [-2.0, -20.0], [6.0, 60.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[-0.25, -0.25], [-1.0, -1.0], [2.0, 2.0]]
    # d/dw of the sum: +sum(x_token) for expert 0 rows, -sum(x_token) for expert 2 rows (original order)
    assert r.weight.grad.tolist() == [-11.0, 11.0, -22.0, 33.0]


def test_combine_gradcheck_in_float64():
    torch.manual_seed(0)
    T, E, D, N = 5, 3, 4, 9
    token, expert = torch.randint(0, T, (N,)), torch.randint(0, E, (N,))
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(N, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        r = Routing(token=token, expert=expert, weight=w, num_tokens=T, num_experts=E)
        x_ND, _, ctx = LocalDispatcher().dispatch(x, r)
        return LocalDispatcher().combine(x_ND.sin(), ctx)

    assert torch.autograd.gradcheck(f, (x, w))
