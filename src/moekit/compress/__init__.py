"""Expert compression: merging, pruning and mixed precision of a trained MoE's experts. Each method
is one file registered with :func:`register_compression` (contract: :class:`CompressionMethod`)."""

from moekit.compress.method import (
    CompressionMethod,
    available_compressions,
    build_compression,
    compress,
    register_compression,
)
from moekit.compress.stats import ExpertStats, gather_stats

__all__ = ["CompressionMethod", "ExpertStats", "available_compressions", "build_compression", "compress",
           "gather_stats", "register_compression"]
