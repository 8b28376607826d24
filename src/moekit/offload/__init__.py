"""Serving MoE models whose experts do not all fit in fast memory.

- :mod:`.store`: every layer's experts on disk, one contiguous checksummed block per expert (experts
  quantized by MC-MoE stored as they are: packed codes, scales and zeros, a block size per width).
- :mod:`.trace`: routing traces recorded from real models (the access stream of decoding).
- :mod:`.future`: the known future of an access stream (a PreGate's routing, a recorded trace).
- :mod:`.policies`: the cache's eviction policies, one file each, registered by name: LRU, LFU and
  Belady (lookahead window up to the whole future: Belady-MIN).
- :mod:`.cache`: the byte-budgeted expert cache (per-layer or global pools, pinned current layer;
  for experts of different sizes, pools per size: :func:`plan_pools`) and :func:`simulate` to run it
  over a trace.
- :mod:`.slab`, :mod:`.kernels`, :mod:`.calibrate`: the cache's memory and its reads, computing one
  expert (loaded, streamed from the store, or from its int8 copy), and Fiddler's cost rule measured.
- :mod:`.runtime`: :func:`offload` serves a model's experts from a store through that cache,
  with prefetching (exact from a known future, or predicted by the next layer's router) and
  mixed precision (int8 copies for misses with a small gate weight), and misses computed
  straight from the store without being admitted (Belady's bypass rule, or Fiddler's).
- :mod:`.checkpoint`: :func:`load_offloaded` serves a saved GPT without loading its experts.
- :mod:`.engine`: text generation with such a model (:class:`Engine`, ``moekit generate``).
- :mod:`.batching`: Read-ME's expert-aware batching of concurrent requests.
"""

from moekit.offload.batching import build_batch, compare_batching, expert_aware_batches, fcfs_batches
from moekit.offload.cache import CacheStats, ExpertCache, PoolPlan, check_direct, plan_pools, simulate, slots_for_budget
from moekit.offload.checkpoint import load_offloaded
from moekit.offload.engine import Engine, find_tokenizer, parse_budget
from moekit.offload.future import Future
from moekit.offload.policies import POLICIES, CachePolicy, available_policies, register_policy
from moekit.offload.runtime import STREAM_BYTES, ExpertServer, OffloadedExperts, ServeStats, offload
from moekit.offload.store import STORE_KIND, ExpertStore, LayerSpec, fingerprint, moe_layers, write_store
from moekit.offload.trace import Trace, record_trace

__all__ = [
    "POLICIES", "STORE_KIND", "STREAM_BYTES", "available_policies", "CachePolicy", "CacheStats", "Engine",
    "ExpertCache", "ExpertServer", "ExpertStore", "Future", "LayerSpec", "OffloadedExperts", "ServeStats",
    "check_direct", "find_tokenizer", "load_offloaded", "Trace", "fingerprint", "moe_layers", "offload",
    "parse_budget", "plan_pools", "PoolPlan", "record_trace", "register_policy", "simulate", "slots_for_budget", "write_store", "build_batch",
    "compare_batching", "expert_aware_batches", "fcfs_batches",
]
