"""What every cache policy shares: the use history its score reads, and the registry of policies by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

from moekit.offload.future import Future, Key
from moekit.registry import Registry

__all__ = ["CachePolicy", "available_policies", "build_policy", "register_policy"]


class CachePolicy:
    """An eviction rule: a miss in a full pool evicts the resident with the lowest :meth:`score`.

    The policy keeps the use history scores are computed from: ``t`` the index of the current
    access, ``last[key]`` the access that last used (or prefetched) ``key``, ``count[key]`` its
    uses since the start (not only while resident). A policy that looks ahead sets
    ``needs_future`` and reads ``future`` up to ``window`` tokens ahead (see :class:`Future`).
    """

    name: ClassVar[str]
    needs_future: ClassVar[bool] = False

    def __init__(self, future: Future | None = None, window: float = math.inf) -> None:
        if self.needs_future and future is None:
            raise ValueError(f"policy={self.name!r} needs the future accesses: pass future=Future(trace accesses) "
                             "(from a PreGate's routing or a recorded trace)")
        self.future, self.window = future, window
        self.t = -1
        self.last: dict[Key, int] = {}
        self.count: dict[Key, int] = {}

    def tick(self) -> None:
        """A new access starts."""
        self.t += 1

    def used(self, key: Key) -> None:
        """The current access needs ``key``."""
        self.last[key] = self.t
        self.count[key] = self.count.get(key, 0) + 1

    def prefetched(self, key: Key) -> None:
        """``key`` was loaded ahead of its use: as recent as the running access, not the next victim."""
        self.last[key] = self.t
        self.count.setdefault(key, 0)

    def score(self, key: Key) -> tuple:
        """The resident with the lowest score is evicted first."""
        raise NotImplementedError


POLICIES: Registry[type[CachePolicy]] = Registry("policy", noun="value", ordered=True)


def register_policy(name: str) -> Callable[[type[CachePolicy]], type[CachePolicy]]:
    """Class decorator: make a :class:`CachePolicy` subclass buildable by ``name``."""
    return POLICIES.register(name)


def available_policies(online: bool = False) -> list[str]:
    """Names of the registered cache policies; ``online=True``: only those that need no knowledge
    of future requests (usable when serving without a PreGate's lookahead)."""
    return [name for name, cls in POLICIES.items() if not (online and cls.needs_future)]


def build_policy(name: str, future: Future | None = None, window: float = math.inf) -> CachePolicy:
    """The policy registered as ``name`` (a ValueError naming the valid names otherwise)."""
    return POLICIES.get(name)(future, window)
