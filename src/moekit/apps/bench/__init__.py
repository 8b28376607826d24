"""Benchmarks: each prints a table and writes JSON (ratios against a baseline run in the same process)."""

from moekit.apps.bench.timing import median_time

__all__ = ["median_time"]
