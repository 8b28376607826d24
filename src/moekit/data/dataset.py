"""Token streams: documents encoded, joined with ``<|endoftext|>``, sampled by step.

Training batches are a pure function of ``(seed, step)``, so the data position of a run is its
step number and a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.data.corpus import Document
from moekit.data.tokenizer import eos_id


@dataclass
class TokenStream:
    ids: Tensor  # [N] int64 token ids
    doc: Tensor  # [N] int32 index into ``docs`` of each token (the EOS after a doc belongs to it)
    docs: list[Document]

    @classmethod
    def from_documents(cls, docs: Sequence[Document], tokenizer, name: str = "corpus") -> TokenStream:
        if not docs:
            raise ValueError(f"{name}: no documents")
        eos = eos_id(tokenizer)
        encs = tokenizer.encode_batch([d.text for d in docs])
        lengths = torch.tensor([len(e.ids) + 1 for e in encs])
        ids = torch.empty(int(lengths.sum()), dtype=torch.long)
        pos = 0
        for e in encs:
            n = len(e.ids)
            ids[pos : pos + n] = torch.tensor(e.ids, dtype=torch.long)
            ids[pos + n] = eos
            pos += n + 1
        doc = torch.repeat_interleave(torch.arange(len(docs), dtype=torch.int32), lengths)
        return cls(ids, doc, list(docs))

    def __len__(self) -> int:
        return self.ids.numel()

    def check_fits(self, seq_len: int, name: str) -> None:
        if len(self) < seq_len + 1:
            raise ValueError(
                f"{name}: {len(self)} tokens is too small for seq_len={seq_len} (needs at least {seq_len + 1}); "
                "give more text or pass a smaller --seq-len"
            )

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Inputs and next-token targets ``[B, T]`` for training step ``step`` (random windows)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        window = self.ids[idx]
        return window[:, :-1], window[:, 1:]

    def chunks(self, seq_len: int, max_chunks: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Non-overlapping windows: inputs, targets and the document of each target.

        With ``max_chunks``, that many windows evenly spread over the whole stream (so that every
        part of the corpus, e.g. every language, is represented).
        """
        n = (len(self) - 1) // seq_len
        starts = torch.arange(n) * seq_len
        if max_chunks is not None and max_chunks < n:
            starts = starts[torch.linspace(0, n - 1, max_chunks).round().long()]
        idx = starts[:, None] + torch.arange(seq_len)
        return self.ids[idx], self.ids[idx + 1], self.doc[idx + 1]

    def labels(self, field: str) -> tuple[list[str], Tensor]:
        """Distinct values of a document field (``language``, ``topic_en``...) and each doc's index into them."""
        values = [getattr(d, field) for d in self.docs]
        names = sorted(set(values))
        index = {v: i for i, v in enumerate(names)}
        return names, torch.tensor([index[v] for v in values], dtype=torch.long)


@dataclass
class TaskStreams:
    """One :class:`TokenStream` per value of a document field (``language``, ``topic_en``...): every
    window comes from one task's documents and carries that task's index, for layers that gate on the
    task (MEO). Batches are a pure function of ``(seed, step)``; a row's task is drawn with
    probability proportional to the task's tokens (the corpus's own mixture)."""

    names: list[str]
    streams: list[TokenStream]

    @classmethod
    def from_documents(cls, docs: Sequence[Document], tokenizer, field: str, name: str = "corpus") -> TaskStreams:
        if not docs:
            raise ValueError(f"{name}: no documents")
        names = sorted({getattr(d, field) for d in docs})
        return cls(names, [TokenStream.from_documents([d for d in docs if getattr(d, field) == v], tokenizer,
                                                      f"{name} ({field}={v})") for v in names])

    def check_fits(self, seq_len: int, name: str) -> None:
        for task, s in zip(self.names, self.streams, strict=True):
            s.check_fits(seq_len, f"{name} ({task})")

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs and targets ``[B, T]`` and each row's task ``[B]`` for training step ``step``."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        sizes = torch.tensor([float(len(s) - seq_len) for s in self.streams])
        task = torch.multinomial(sizes, batch_size, replacement=True, generator=g)
        starts = (torch.rand(batch_size, generator=g, dtype=torch.float64) * sizes[task].double()).long()
        rows = [self.streams[t].ids[s : s + seq_len + 1] for t, s in zip(task.tolist(), starts.tolist(), strict=True)]
        window = torch.stack(rows)
        return window[:, :-1], window[:, 1:], task

    def chunks(self, seq_len: int, max_chunks: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Non-overlapping windows of every task (``max_chunks`` per task, evenly spread), their targets
        and their tasks."""
        parts = [s.chunks(seq_len, max_chunks)[:2] for s in self.streams]
        tasks = [torch.full((p[0].shape[0],), i, dtype=torch.long) for i, p in enumerate(parts)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat(tasks)
