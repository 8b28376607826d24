"""One optimisation step, shared by the Trainer, conversion fine-tuning and Read-ME tuning.

A step: the loss (a causal LM's loss plus the MoE auxiliary losses), zeroed gradients, backward,
the gradient norm clipped, the optimizer's update. :func:`fine_tune` is the plain loop over it that
conversions use: AdamW on every parameter at a constant learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from rich.progress import track
from torch import Tensor, nn

from moekit.layer import aux_loss

__all__ = ["lm_and_aux", "set_lr", "clipped_backward", "optimizer_step", "fine_tune"]

LMLoss = Callable[[nn.Module, Tensor, Tensor], Tensor]


def lm_and_aux(model: nn.Module, x: Tensor, y: Tensor, lm_loss: LMLoss | None = None) -> tuple[Tensor, Tensor]:
    """``(LM loss, MoE auxiliary loss)`` of one batch; ``lm_loss(model, x, y)`` defaults to ``model.loss(x, y)``."""
    lm = model.loss(x, y) if lm_loss is None else lm_loss(model, x, y)
    return lm, aux_loss(model)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def clipped_backward(optimizer: torch.optim.Optimizer, loss: Tensor, params: Iterable[Tensor], clip: float) -> float:
    """Zero the gradients, backpropagate ``loss`` and clip the gradients of ``params`` to norm ``clip``;
    returns the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return float(torch.nn.utils.clip_grad_norm_(params, clip))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, params: Iterable[Tensor], clip: float = 1.0,
                   lr: float | None = None) -> float:
    """One update on ``loss`` (at learning rate ``lr`` if given); returns the gradient norm before clipping."""
    if lr is not None:
        set_lr(optimizer, lr)
    norm = clipped_backward(optimizer, loss, params, clip)
    optimizer.step()
    return norm


def fine_tune(model: nn.Module, batches: Callable[[int], tuple[Tensor, Tensor]], steps: int, lr: float,
              lm_loss: LMLoss | None = None, weight_decay: float = 0.01, clip: float = 1.0,
              progress: bool = False) -> list[float]:
    """``steps`` updates of AdamW (every parameter, constant ``lr``) on the LM loss plus the MoE
    auxiliary losses of ``batches(step) -> (x, y)``; leaves the model in eval mode and returns the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for step in track(range(steps), description="fine-tuning", disable=not progress):
        lm, aux = lm_and_aux(model, *batches(step), lm_loss)
        loss = lm + aux
        optimizer_step(opt, loss, model.parameters(), clip)
        losses.append(float(loss.detach()))
    model.eval()
    return losses
