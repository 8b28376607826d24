"""Exact reads from a file descriptor, optionally past the OS page cache.

``read_uncached`` drops the byte range from the page cache (``posix_fadvise(DONTNEED)``: clean
pages are evicted, so the read goes to the device) and then reads it with ``os.preadv`` straight
into the caller's buffer: what a benchmark of cold reads needs. Every read is exact: fewer bytes
than the buffer holds (a file truncated or changed on disk) raise :class:`ShortRead`.
"""

from __future__ import annotations

import os

__all__ = ["ShortRead", "drop_page_cache", "pread_exact", "read_uncached"]


class ShortRead(OSError):
    """A read returned fewer bytes than asked for: ``got`` of ``want``."""

    def __init__(self, got: int, want: int, offset: int) -> None:
        super().__init__(f"short read: {got} of {want} bytes at offset {offset}")
        self.got, self.want, self.offset = got, want, offset


def drop_page_cache(fd: int, offset: int, length: int) -> None:
    """Evict ``length`` bytes at ``offset`` of ``fd`` from the OS page cache (where the OS allows it)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def pread_exact(fd: int, buf, offset: int) -> None:
    """Fill ``buf`` (any writable buffer: a numpy array, a ``memoryview``...) from ``offset`` of ``fd``."""
    want = memoryview(buf).nbytes
    got = os.preadv(fd, [buf], offset)
    if got != want:
        raise ShortRead(got, want, offset)


def read_uncached(fd: int, buf, offset: int) -> None:
    """:func:`pread_exact` after dropping the range from the page cache: a real read from the device."""
    drop_page_cache(fd, offset, memoryview(buf).nbytes)
    pread_exact(fd, buf, offset)
