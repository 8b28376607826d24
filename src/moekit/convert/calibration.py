"""Calibration text for conversions: token batches, one forward per batch, and channel importance.

Conversions that look at activations (clustering by co-activation, pruning, Read-ME's domain masks,
fitted routers) run the dense model on calibration token ids and measure each FFN's hidden
activation ``h`` (the down projection's input).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.progress import track
from torch import Tensor, nn

from moekit.convert.ffn import collect_hidden, find_ffns
from moekit.models import GPT

__all__ = ["MIN_CALIBRATION_TOKENS", "calibration_batches", "calibration_batches_for", "default_run",
           "channel_importance"]

MIN_CALIBRATION_TOKENS = 512


def calibration_batches(calibration, batch_size: int = 8) -> list:
    """Calibration data as a list of batches: a ``[B, T]`` tensor of token ids is cut into batches of
    ``batch_size`` sequences; a list of tensors (or of dicts for Hugging Face models) is used as is."""
    if isinstance(calibration, Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration: expected token ids [num_sequences, seq_len] (int64), got "
                             f"{tuple(calibration.shape)} {calibration.dtype}")
        return list(calibration.split(batch_size))
    return list(calibration)


def _tokens(batches: list) -> int:
    return sum(int(b.numel()) if isinstance(b, Tensor) else int(b["input_ids"].numel()) for b in batches)


def calibration_batches_for(calibration, min_tokens: int, who: str) -> list:
    """:func:`calibration_batches` of ``calibration``, which must be given and hold at least
    ``min_tokens`` tokens (``who`` names the caller in the error)."""
    if calibration is None:
        raise ValueError(f"{who}: this setting needs calibration token ids (a [num_sequences, seq_len] tensor)")
    batches = calibration_batches(calibration)
    n = _tokens(batches)
    if n < min_tokens:
        raise ValueError(f"{who}: calibration text too small: {n} tokens, need at least {min_tokens}; "
                         "pass more sequences (or lower min_tokens)")
    return batches


def default_run(model: nn.Module, batch) -> object:
    """One calibration forward: ``model(ids)`` for moekit's GPT, ``model(input_ids=ids)`` for transformers."""
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch) if isinstance(model, GPT) else model(input_ids=batch)


@torch.no_grad()
def channel_importance(model: nn.Module, calibration, run: Callable | None = None,
                       min_tokens: int = MIN_CALIBRATION_TOKENS, max_samples: int = 0,
                       progress: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """Per FFN: mean ``|h|`` of each hidden channel over the calibration tokens (``h`` = the down
    projection's input, as Read-ME's code measures it), and, if ``max_samples > 0``, ``|h|`` of up to
    that many tokens ``[F, samples]`` (co-activation features for clustering)."""
    batches = calibration_batches_for(calibration, min_tokens, "channel_importance")
    sites = find_ffns(model)
    sums = [None] * len(sites)
    samples: list[list[Tensor]] = [[] for _ in sites]

    def reduce(layer: int, h: Tensor) -> None:
        a = h.abs()
        sums[layer] = a.sum(0) if sums[layer] is None else sums[layer] + a.sum(0)
        have = sum(s.shape[0] for s in samples[layer])
        if have < max_samples:
            samples[layer].append(a[: max_samples - have].cpu())

    was = model.training
    model.eval()
    try:
        n = collect_hidden(model, sites, track(batches, description="calibration", disable=not progress,
                                               transient=True), run or default_run, reduce)
    finally:
        model.train(was)
    means = [s / n for s in sums]
    feats = [torch.cat(s).T.contiguous() if s else None for s in samples]
    return means, feats
