"""The expert cache's memory: one preallocated slab per pool and the reads that fill its slots.

Each pool is one ``slots x block`` tensor allocated once on the cache's device (the CPU, or a GPU in
front of host memory), so the budget is a real allocation that is never exceeded. A load reads an
expert's block from the store straight into its slot (``preadv``; through a pinned buffer for a GPU),
or copies it from the host copy of every expert (``host="ram"``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from moekit.offload.store import ExpertStore, LayerSpec

__all__ = ["SlabMemory"]


class SlabMemory:
    """The slabs of the pools and, with ``host="ram"``, the host copy of every expert.

    Args:
        store: the opened store.
        slots: slots per pool.
        pool_of: the pool of each ``(layer, expert)``.
        device: where the slabs live.
        host: ``"disk"`` (loads read the store) or ``"ram"`` (every expert read once into host memory).

    A store with quantized layers has ``uint8`` slabs (rows of whole 8-byte words, so every part's view
    is aligned; a float block is read into a row viewed as the store's dtype); otherwise the slabs are
    of the store's dtype.
    """

    def __init__(self, store: ExpertStore, slots: Sequence[int], pool_of: Callable[[int, int], int],
                 device: torch.device, host: str) -> None:
        self.store, self.pool_of, self.device, self.host = store, pool_of, device, host
        dtype = torch.uint8 if store.quantized else store.dtype
        width = [0] * len(slots)
        for i, sizes in enumerate(store.sizes):
            for e, n in enumerate(sizes):
                p = pool_of(i, e)
                width[p] = max(width[p], -(-n // 8) * 8 if store.quantized else n // dtype.itemsize)
        self.slabs = [torch.empty(n, w, dtype=dtype, device=device) for n, w in zip(slots, width)]
        # pageable host memory: the pinned allocator would round every block up to a power of two
        self.host_blocks = None if host == "disk" else [
            [store.read(i, e, torch.empty(n // store.block_dtype(i).itemsize, dtype=store.block_dtype(i)))
             for e, n in enumerate(sizes)] for i, sizes in enumerate(store.sizes)]
        self.host_parts = None if host == "disk" else [  # views, made once
            [self.split(i, e, block) for e, block in enumerate(blocks)] for i, blocks in enumerate(self.host_blocks)]
        self.staging = threading.local()  # disk -> pinned host buffer -> GPU, one buffer per reading thread
        self.views: dict[tuple[LayerSpec, int, int, int], dict[str, Tensor]] = {}

    def resident_bytes(self) -> int:
        """Bytes of the slabs."""
        return sum(s.numel() * s.element_size() for s in self.slabs)

    def split(self, layer: int, expert: int, block: Tensor) -> dict:
        """The parts of one expert's block (:meth:`LayerSpec.split` or :meth:`LayerSpec.split_quant`)."""
        spec = self.store.layers[layer]
        return spec.split_quant(expert, block) if spec.quantized else spec.split(block)

    def _row(self, layer: int, expert: int, slot: int) -> Tensor:
        """The slot, as the dtype of the expert's block."""
        row = self.slabs[self.pool_of(layer, expert)][slot]
        dtype = self.store.block_dtype(layer)
        return row if row.dtype == dtype else row.view(dtype)

    def read(self, layer: int, expert: int, slot: int) -> float:
        """Load an expert into a slot: from the host copy, or read from the store (straight into the
        slot on the CPU, through a pinned buffer for a GPU). Returns the seconds it took."""
        t0 = time.perf_counter()
        dtype = self.store.block_dtype(layer)
        n = self.store.sizes[layer][expert] // dtype.itemsize
        dst = self._row(layer, expert, slot)
        if self.host_blocks is not None:
            dst[:n].copy_(self.host_blocks[layer][expert])
        elif self.device.type == "cpu":
            self.store.read(layer, expert, dst)
        else:
            buf = getattr(self.staging, "buf", None)
            if buf is None:  # sized for the largest block of any layer, in whole 8-byte words
                most = max(max(sizes) for sizes in self.store.sizes)
                buf = self.staging.buf = torch.empty(-(-most // 8) * 8, dtype=torch.uint8, pin_memory=True)
            dst[:n].copy_(self.store.read(layer, expert, buf.view(dtype))[:n])  # synchronous: the buffer is reused
        return time.perf_counter() - t0

    def parts(self, layer: int, expert: int, slot: int) -> dict:
        """The parts of the expert in ``slot`` of its pool (views, made once per slot and layer shape)."""
        spec, pool = self.store.layers[layer], self.pool_of(layer, expert)
        key = (spec, pool, slot, spec.bits[expert] if spec.quantized else 0)
        views = self.views.get(key)
        if views is None:
            views = self.views[key] = self.split(layer, expert, self._row(layer, expert, slot))
        return views
