"""``lru``: evict the least recently used expert."""

from moekit.offload.future import Key
from moekit.offload.policies.base import CachePolicy, register_policy


@register_policy("lru")
class LRU(CachePolicy):
    """Least recently used first."""

    def score(self, key: Key) -> tuple:
        return (self.last[key],)
