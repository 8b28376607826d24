"""The MoLE table read back: :class:`LookupTable` serves the rows of the token ids a batch needs."""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.io import IntegrityError, read_json, verify
from moekit.models.mole.format import (
    DTYPES,
    MANIFEST,
    QUANTIZED,
    ROW_CRC,
    TABLE,
    TABLE_FIX,
    TABLE_FORMAT,
    TABLE_KIND,
    dequantize,
)
from moekit.ops.uncached import ShortRead, read_uncached

__all__ = ["LookupTable"]


def _manifest(path: Path, expect_hash: str | None) -> dict:
    """The table's manifest, checked: a supported format, the expected source, a whole table file."""
    if not (path / MANIFEST).exists():
        raise FileNotFoundError(f"{path / MANIFEST}: missing; was the table written by moekit.models.mole.reparameterize?")
    verify(path, TABLE_KIND, TABLE_FIX)
    m = read_json(path / MANIFEST, TABLE_FIX)
    if m.get("format") != TABLE_FORMAT or m.get("layout") != "V,L,N,D" or m.get("dtype") not in (*DTYPES, *QUANTIZED):
        raise ValueError(f"{path}: unsupported table (format {m.get('format')}, dtype {m.get('dtype')})")
    if expect_hash is not None and m["source_sha256"] != expect_hash:
        raise ValueError(
            f"{path}: the table was built for other weights (hash {m['source_sha256'][:12]} != model "
            f"{expect_hash[:12]}); re-run moekit.models.mole.reparameterize on this model"
        )
    table = path / TABLE
    size = table.stat().st_size if table.exists() else None
    if size != m["bytes"]:
        raise ValueError(f"{table}: {'missing' if size is None else f'{size} bytes'}, expected {m['bytes']} "
                         "(truncated or incomplete); re-run moekit.models.mole.reparameterize")
    return m


class LookupTable:
    """The on-disk table, memory-mapped; reads only the rows asked for, and counts the bytes read.

    ``cache_bytes > 0`` keeps recently used tokens' rows in RAM (least recently used evicted first;
    the budget is never exceeded); ``bytes_read`` then counts only what came from the table.
    """

    def __init__(self, path: str | os.PathLike, expect_hash: str | None = None, cache_bytes: int = 0) -> None:
        path = Path(path)
        m = _manifest(path, expect_hash)
        self.manifest, self.path = m, path
        self.shape = (m["vocab_size"], m["n_layers"], m["num_experts"], m["d_model"])
        self.kind = m["dtype"]
        if self.kind in QUANTIZED:
            self.rows = np.memmap(path / TABLE, dtype=np.uint8, mode="r", shape=(self.shape[0], m["bytes_per_token"]))
        else:
            np_dtype = np.dtype(DTYPES[self.kind][1]).newbyteorder("<")
            self.rows = np.memmap(path / TABLE, dtype=np_dtype, mode="r", shape=self.shape)
        self.bytes_per_token = m["bytes_per_token"]
        self.crc32 = np.fromfile(path / ROW_CRC, dtype="<u4")
        if self.crc32.shape != (self.shape[0],):
            raise IntegrityError(f"{path / ROW_CRC}: {self.crc32.size} checksums for {self.shape[0]} tokens; {TABLE_FIX}")
        #: check each record read from disk against its CRC-32 (about a microsecond per 4 KiB record)
        self.verify = True
        self.bytes_read = 0
        #: read each row with pread after dropping it from the OS page cache (benchmarks of cold reads)
        self.drop_page_cache = False
        self._fd: int | None = None
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.cache_rows = cache_bytes // self.bytes_per_token  # whole rows only: never over budget
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_hits = 0
        self._last: tuple[list, Tensor] | None = None  # the last ids read and their rows [U, L, N, D]
        self._last_one: tuple[list, tuple[Tensor, ...]] | None = None  # one id's rows, per layer

    def read(self, ids: Tensor, layer: int) -> Tensor:
        """Layer ``layer``'s rows ``[U, N, D]`` (fp32) of the given sorted unique token ids. All layers'
        rows are read at once (one read per token) and kept for the layers that follow."""
        return self._rows(ids.tolist())[:, layer]

    def read_one(self, ids: Tensor, layer: int) -> Tensor:
        """Layer ``layer``'s rows ``[N, D]`` of one token id: :meth:`read` for the decode step."""
        key = ids.tolist()
        if self._last_one is None or self._last_one[0] != key:
            self._last_one = (key, self._rows(key)[0].unbind(0))
        return self._last_one[1][layer]

    def _rows(self, key: list[int]) -> Tensor:
        """All layers' rows ``[U, L, N, D]`` (fp32) of the ids in ``key``; the last call's are kept."""
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if key and (min(key) < 0 or max(key) >= self.shape[0]):
            raise ValueError(f"lookup table: token ids must lie in [0, {self.shape[0]}), got [{min(key)}, {max(key)}]")
        raw = self._fetch(key)
        if self.kind in QUANTIZED:
            rows = dequantize(raw, self.kind, self.shape[1:], self.manifest["block"] or 64)
        else:
            rows = torch.from_numpy(raw).float()
        self._last = (key, rows)
        return rows

    @property
    def cached_bytes(self) -> int:
        return len(self._cache) * self.bytes_per_token

    def _fetch(self, key: list[int]) -> np.ndarray:
        """Stored rows of the ids in ``key`` (storage dtype, a fresh array), from the RAM cache where possible."""
        out = np.empty((len(key), *self.rows.shape[1:]), dtype=self.rows.dtype)
        missing = list(range(len(key)))
        if self.cache_rows:
            missing = []
            for i, v in enumerate(key):
                row = self._cache.get(v)
                if row is None:
                    missing.append(i)
                else:
                    out[i] = row
                    self._cache.move_to_end(v)
            self.cache_hits += len(key) - len(missing)
        if missing and self.drop_page_cache:
            self._read_uncached(key, missing, out)
        elif missing:
            out[missing] = self.rows[[key[i] for i in missing]]
        if self.verify:
            raw = out.reshape(len(key), -1).view(np.uint8)
            for i in missing:
                if zlib.crc32(raw[i]) != self.crc32[key[i]]:
                    raise IntegrityError(f"{self.path / TABLE}: the record of token {key[i]} does not match its "
                                         f"checksum (the table is corrupt); {TABLE_FIX}")
        self.bytes_read += len(missing) * self.bytes_per_token
        for i in missing if self.cache_rows else ():
            self._cache[key[i]] = out[i].copy()
            if len(self._cache) > self.cache_rows:
                self._cache.popitem(last=False)
        return out

    def _read_uncached(self, key: list[int], missing: list[int], out: np.ndarray) -> None:
        """Read the records ``out[i]`` of ``key[i]`` for ``i`` in ``missing`` from the device, past the page cache."""
        if self._fd is None:
            self._fd = os.open(self.path / TABLE, os.O_RDONLY)
        n = self.bytes_per_token
        for i in missing:
            try:
                read_uncached(self._fd, memoryview(out[i]).cast("B"), key[i] * n)
            except ShortRead:
                raise OSError(f"{self.path / TABLE}: short read of token {key[i]}; the table file changed on disk") from None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
