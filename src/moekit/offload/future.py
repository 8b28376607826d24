"""The known future of an access stream: which accesses need each expert, and when.

What Belady's rule and exact prefetching look ahead into: a PreGate's routing (Read-ME: routing
known before the backbone runs, appended forward by forward) or a recorded trace (the whole future).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = ["Future", "Key"]

Key = tuple[int, int]  # (layer, expert)


class Future:
    """The known future of an access stream: for each ``(layer, expert)``, the access indices at
    which it is needed, so ``next_use`` is a bisection.

    ``tokens[i]`` is the token of access ``i`` (default: each access its own token); the lookahead
    window counts tokens: ``window=1`` sees the remaining layers of the current token (what a
    PreGate knows when decoding), ``window=16`` also the next 15 tokens (a queued prompt), ``inf``
    everything (Belady-MIN)."""

    def __init__(self, accesses: Sequence[tuple[int, Sequence[int]]], tokens: Sequence[int] | None = None) -> None:
        self.uses: dict[Key, list[int]] = {}
        for t, (layer, experts) in enumerate(accesses):
            for e in experts:
                self.uses.setdefault((layer, int(e)), []).append(t)
        self.accesses = list(accesses)
        self.length = len(accesses)
        self.tokens = list(range(self.length)) if tokens is None else list(tokens)
        if len(self.tokens) != self.length:
            raise ValueError(f"Future: {len(self.tokens)} tokens for {self.length} accesses")

    def extend(self, accesses: Sequence[tuple[int, Sequence[int]]], tokens: Sequence[int]) -> None:
        """Append accesses learned ahead of their use (e.g. a PreGate routing the next forward)."""
        if len(tokens) != len(accesses):
            raise ValueError(f"Future.extend: {len(tokens)} tokens for {len(accesses)} accesses")
        for i, (layer, experts) in enumerate(accesses, start=self.length):
            for e in experts:
                self.uses.setdefault((layer, int(e)), []).append(i)
        self.accesses.extend(accesses)
        self.tokens += list(tokens)
        self.length += len(accesses)

    def next_use(self, key: Key, t: int, window: float) -> float:
        """The first access index ``> t`` that needs ``key`` within ``window`` tokens; ``inf`` if none."""
        uses = self.uses.get(key)
        if not uses:
            return math.inf
        i = bisect.bisect_right(uses, t)
        if i == len(uses) or (t >= 0 and self.tokens[uses[i]] - self.tokens[t] >= window):
            return math.inf
        return uses[i]
