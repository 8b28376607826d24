"""The shared optimisation step (moekit/train/step.py): the same updates as a loop written out by hand."""

import torch

from moekit.layer import aux_loss
from moekit.models import GPT, GPTConfig
from moekit.train.step import fine_tune, optimizer_step


def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, d_ff=32).with_moe(4, 2))


def _batches(step):
    g = torch.Generator().manual_seed(step)
    w = torch.randint(0, 40, (2, 9), generator=g)
    return w[:, :-1], w[:, 1:]


def test_fine_tune_equals_the_loop_written_out():
    a, b = _gpt(), _gpt()
    losses = fine_tune(a, _batches, 3, 1e-2)
    opt = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01)
    b.train()
    want = []
    for step in range(3):
        loss = b.loss(*_batches(step)) + aux_loss(b)
        want.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        opt.step()
    assert losses == want
    assert not a.training
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_optimizer_step_sets_the_rate_clips_and_returns_the_norm():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=1.0)
    norm = optimizer_step(opt, (w * torch.tensor([3.0, 4.0], dtype=torch.float64)).sum(), [w], clip=1.0, lr=0.5)
    assert norm == 5.0  # the gradient (3, 4), scaled by 1 / (5 + 1e-6) (PyTorch's clip), then a step of 0.5
    assert opt.param_groups[0]["lr"] == 0.5
    want = torch.tensor([3.0, 4.0], dtype=torch.float64) * (1 - 0.5 / (5 + 1e-6))
    torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-14)
