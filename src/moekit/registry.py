"""Name -> implementation registries, one per method family (routers, FFN kinds, cache policies,
conversion methods, compression methods), so configs and the command line name them by string and
a new method is one file with one decorator line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """The implementations of one family by name.

    Args:
        what: how errors name the family (``"router"``, ``"GPTConfig.ffn"``...).
        noun: what a name is called in errors (``"name"``, ``"kind"``, ``"value"``...).
        ordered: list names in registration order (default: sorted).
    """

    def __init__(self, what: str, noun: str = "name", ordered: bool = False) -> None:
        self.what, self.noun, self.ordered = what, noun, ordered
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register a class or function under ``name`` (a class also gets ``cls.name = name``).
        Registering another object under a taken name is an error."""

        def deco(obj: T) -> T:
            known = self._items.setdefault(name, obj)
            if known is not obj:
                raise ValueError(f"{self.what} {name!r} is already registered to {getattr(known, '__name__', known)}")
            if isinstance(obj, type):
                obj.name = name
            return obj

        return deco

    def names(self) -> list[str]:
        return list(self._items) if self.ordered else sorted(self._items)

    def get(self, name: str) -> T:
        """The implementation registered as ``name`` (a ValueError naming the valid ones otherwise)."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.what}: unknown {self.noun} {name!r}; valid {self.noun}s are {self.names()}") from None

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()) if not self.ordered else list(self._items.items()))

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a test's temporary method, a plugin unloaded)."""
        self._items.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
