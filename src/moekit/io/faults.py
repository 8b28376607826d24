"""Fault injection: ``fault_point(stage)`` marks the steps of a multi-file write; a test installs a
hook with :func:`fault_hook` to raise or kill the process at any of them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_HOOK: Callable[[str], None] | None = None


def fault_point(stage: str) -> None:
    """A named step of a multi-file write (a no-op unless a test installed a hook)."""
    if _HOOK is not None:
        _HOOK(stage)


@contextlib.contextmanager
def fault_hook(hook: Callable[[str], None]) -> Iterator[None]:
    """Call ``hook(stage)`` at every :func:`fault_point` inside the block (tests: raise, or ``os._exit``)."""
    global _HOOK
    old, _HOOK = _HOOK, hook
    try:
        yield
    finally:
        _HOOK = old
