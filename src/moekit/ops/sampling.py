"""Choosing the next token from a language model's logits: greedy, or sampled with a temperature,
top-k and nucleus (top-p) truncation, and stopping at end-of-sequence tokens.

The order and conventions are those of Hugging Face's ``generate`` (temperature, then top-k, then
top-p; top-p keeps the smallest set of most likely tokens whose probability reaches ``p``, and at
least one token), so the same options mean the same thing for a moekit GPT and a transformers model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit._checks import check_number

__all__ = ["Sampling", "truncate_logits", "next_token", "eos_ids"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature=0`` is greedy (``top_k``/``top_p`` then change nothing)."""

    temperature: float = 0.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the most likely tokens until their probability reaches p

    def __post_init__(self) -> None:
        check_number("temperature", self.temperature, lo=0, owner="Sampling")
        if self.top_k is not None:
            check_number("top_k", self.top_k, lo=1, integer=True, owner="Sampling")
        if self.top_p is not None:
            check_number("top_p", self.top_p, lo=0, hi=1, lo_open=True, owner="Sampling")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def truncate_logits(logits_BV: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """``logits`` (already divided by the temperature) with the tokens top-k and top-p drop set to ``-inf``."""
    out = logits_BV.float()
    if top_k is not None and top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_, order = out.sort(dim=-1, descending=True)
        probs = sorted_.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def next_token(logits_BV: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """The next token of each row, ``[B, 1]``."""
    if sampling.greedy:
        return logits_BV.argmax(-1, keepdim=True)
    scaled = truncate_logits(logits_BV.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)


def eos_ids(eos: int | Sequence[int] | None, vocab_size: int) -> list[int]:
    """``eos`` as a checked list of token ids (empty: never stop early)."""
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ValueError(f"eos_token_id: {i!r} is not a token id in [0, {vocab_size})")
    return ids
