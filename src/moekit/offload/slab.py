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
        pool_of: the pool of each layer.
        device: where the slabs live.
        host: ``"disk"`` (loads read the store) or ``"ram"`` (every expert read once into host memory).
    """

    def __init__(self, store: ExpertStore, slots: Sequence[int], pool_of: Callable[[int], int], device: torch.device,
                 host: str) -> None:
        self.store, self.pool_of, self.device, self.host = store, pool_of, device, host
        L = len(store.layers)
        width = [max(store.layers[i].numel for i in range(L) if pool_of(i) == p) for p in range(len(slots))]
        self.slabs = [torch.empty(n, w, dtype=store.dtype, device=device) for n, w in zip(slots, width)]
        # pageable host memory: the pinned allocator would round every block up to a power of two
        self.host_blocks = None if host == "disk" else [
            [store.read(i, e, torch.empty(spec.numel, dtype=store.dtype)) for e in range(spec.num_experts)]
            for i, spec in enumerate(store.layers)]
        self.host_parts = None if host == "disk" else [  # views, made once
            [spec.split(block) for block in blocks] for spec, blocks in zip(store.layers, self.host_blocks)]
        self.staging = threading.local()  # disk -> pinned host buffer -> GPU, one buffer per reading thread
        self.views: dict[tuple[LayerSpec, int, int], dict[str, Tensor]] = {}

    def resident_bytes(self) -> int:
        """Bytes of the slabs."""
        return sum(s.numel() * s.element_size() for s in self.slabs)

    def read(self, layer: int, expert: int, slot: int) -> float:
        """Load an expert into a slot: from the host copy, or read from the store (straight into the
        slot on the CPU, through a pinned buffer for a GPU). Returns the seconds it took."""
        t0 = time.perf_counter()
        n = self.store.layers[layer].numel
        dst = self.slabs[self.pool_of(layer)][slot]
        if self.host_blocks is not None:
            dst[:n].copy_(self.host_blocks[layer][expert])
        elif self.device.type == "cpu":
            self.store.read(layer, expert, dst)
        else:
            buf = getattr(self.staging, "buf", None)
            if buf is None:  # sized for the largest block of any layer
                buf = self.staging.buf = torch.empty(max(s.numel for s in self.store.layers), dtype=self.store.dtype,
                                                     pin_memory=True)
            dst[:n].copy_(self.store.read(layer, expert, buf)[:n])  # synchronous: the pinned buffer is reused
        return time.perf_counter() - t0

    def parts(self, layer: int, slot: int) -> dict[str, Tensor]:
        """The parts of the expert in ``slot`` of ``layer``'s pool (views, made once per slot and layer shape)."""
        spec, pool = self.store.layers[layer], self.pool_of(layer)
        views = self.views.get((spec, pool, slot))
        if views is None:
            views = self.views[spec, pool, slot] = spec.split(self.slabs[pool][slot])
        return views
