"""``lfu``: evict the least frequently used expert."""

from moekit.offload.future import Key
from moekit.offload.policies.base import CachePolicy, register_policy


@register_policy("lfu")
class LFU(CachePolicy):
    """Fewest uses since the start (not only while resident) first, ties by last use."""

    def score(self, key: Key) -> tuple:
        return (self.count[key], self.last[key])
