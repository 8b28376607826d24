"""Serving MoE models whose experts do not all fit in fast memory.

- :mod:`.store`: every layer's experts on disk, one contiguous checksummed block per expert.
- :mod:`.trace`: routing traces recorded from real models (the access stream of decoding).
- :mod:`.cache`: the byte-budgeted expert cache (per-layer or global pools, pinned current layer)
  with LRU, LFU and Belady (lookahead window up to the whole future: Belady-MIN) eviction, and
  :func:`simulate` to run it over a trace.
- :mod:`.runtime`: :func:`offload` serves a model's experts from a store through that cache,
  with prefetching (exact from a known future, or predicted by the next layer's router) and
  mixed precision (int8 copies for misses with a small gate weight), and misses computed
  straight from the store without being admitted (Belady's bypass rule, or Fiddler's).
- :mod:`.batching`: Read-ME's expert-aware batching of concurrent requests.
"""

from moekit.offload.batching import build_batch, compare_batching, expert_aware_batches, fcfs_batches
from moekit.offload.cache import POLICIES, available_policies, CacheStats, ExpertCache, Future, simulate, slots_for_budget
from moekit.offload.runtime import ExpertServer, OffloadedExperts, ServeStats, load_offloaded, offload
from moekit.offload.store import ExpertStore, LayerSpec, fingerprint, moe_layers, write_store
from moekit.offload.trace import Trace, record_trace

__all__ = [
    "POLICIES", "available_policies", "CacheStats", "ExpertCache", "ExpertServer", "ExpertStore", "Future", "LayerSpec",
    "OffloadedExperts", "ServeStats", "load_offloaded", "Trace", "fingerprint", "moe_layers", "offload", "record_trace",
    "simulate", "slots_for_budget", "write_store", "build_batch", "compare_batching", "expert_aware_batches",
    "fcfs_batches",
]
