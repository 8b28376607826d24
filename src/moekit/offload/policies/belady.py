"""``belady``: evict the expert needed farthest ahead (Belady's rule on the known part of the future).

The future comes from a PreGate (Read-ME: routing known before the backbone runs) or from a recorded
trace, seen ``window`` tokens ahead; with the whole future it is Belady-MIN, the offline optimum for
equal-size items and the yardstick of every other policy.
"""

from moekit.offload.future import Key
from moekit.offload.policies.base import CachePolicy, register_policy


@register_policy("belady")
class Belady(CachePolicy):
    """Next use within the lookahead window, farthest (or never) first; ties by last use."""

    needs_future = True

    def score(self, key: Key) -> tuple:
        nxt = self.future.next_use(key, self.t, self.window)
        return (-nxt, self.last[key])  # farthest (or never) first
