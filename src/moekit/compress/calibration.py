"""Calibration batches from one domain of a corpus (a language or a topic), for domain-specific
expert pruning: gather the statistics on these batches only."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from moekit._checks import check_number
from moekit.data.corpus import Document
from moekit.data.dataset import TokenStream

__all__ = ["domain_batches"]


def domain_batches(docs: Sequence[Document], tokenizer, field: str, value: str, seq_len: int,
                   num_windows: int, batch_size: int = 8, split: str = "train") -> list[Tensor]:
    """Token-id batches ``[B, seq_len]`` of ``num_windows`` windows spread evenly over the ``split``
    documents whose ``field`` (``"language"``, ``"topic"``, ``"topic_en"``) equals ``value``."""
    check_number("seq_len", seq_len, lo=1, integer=True, owner="domain_batches")
    check_number("num_windows", num_windows, lo=1, integer=True, owner="domain_batches")
    check_number("batch_size", batch_size, lo=1, integer=True, owner="domain_batches")
    if field not in ("language", "topic", "topic_en"):
        raise ValueError(f"domain_batches: field must be 'language', 'topic' or 'topic_en', got {field!r}")
    chosen = [d for d in docs if d.split == split and getattr(d, field) == value]
    if not chosen:
        found = sorted({getattr(d, field) for d in docs if d.split == split})
        raise ValueError(f"domain_batches: no {split} document has {field}={value!r}; found {found}")
    stream = TokenStream.from_documents(chosen, tokenizer, name=f"{field}={value}")
    stream.check_fits(seq_len, f"domain_batches({field}={value!r})")
    ids = stream.chunks(seq_len, num_windows)[0]
    return list(ids.split(batch_size))
