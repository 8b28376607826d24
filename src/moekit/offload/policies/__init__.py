"""Eviction policies of the expert cache, one file each, registered by name.

A new policy is one file: a :class:`CachePolicy` subclass with a ``score`` (the lowest is evicted),
decorated with ``@register_policy(name)`` and imported here. Every registered policy is held to the
cache's property tests (never worse than Belady-MIN, the simulator equal to the runtime).
"""

# imported in the order available_policies() lists them
from moekit.offload.policies.base import POLICIES, CachePolicy, available_policies, build_policy, register_policy  # noqa: I001
from moekit.offload.policies.lru import LRU
from moekit.offload.policies.lfu import LFU
from moekit.offload.policies.belady import Belady

__all__ = ["LRU", "LFU", "Belady", "POLICIES", "CachePolicy", "available_policies", "build_policy", "register_policy"]
