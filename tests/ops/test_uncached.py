"""Uncached reads against a file written here (moekit.ops.uncached): exact bytes at an offset, a short read
raising, the page cache dropped first."""

import os

import numpy as np
import pytest

from moekit.ops import uncached
from moekit.ops.uncached import ShortRead, pread_exact, read_uncached


@pytest.fixture
def fd(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(100)))
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_reads_the_bytes_at_the_offset_into_the_buffer(fd):
    buf = np.zeros(5, dtype=np.uint8)
    read_uncached(fd, buf, 10)
    assert buf.tolist() == [10, 11, 12, 13, 14]
    out = bytearray(3)
    pread_exact(fd, memoryview(out), 97)
    assert list(out) == [97, 98, 99]


def test_a_short_read_raises(fd):
    buf = np.zeros(8, dtype=np.uint8)
    with pytest.raises(ShortRead, match="short read: 4 of 8 bytes at offset 96") as e:
        read_uncached(fd, buf, 96)
    assert (e.value.got, e.value.want, e.value.offset) == (4, 8, 96)
    assert isinstance(e.value, OSError)


def test_the_range_is_dropped_from_the_page_cache_first(fd, monkeypatch):
    calls = []
    monkeypatch.setattr(uncached.os, "posix_fadvise", lambda *a: calls.append(a), raising=False)
    read_uncached(fd, bytearray(16), 32)
    assert calls == [(fd, 32, 16, os.POSIX_FADV_DONTNEED)]
