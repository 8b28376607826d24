"""`moekit bench NAME`: the benchmarks, one subcommand each (each prints a table and writes JSON)."""

from __future__ import annotations

from moekit.apps.cli import bench_layer, bench_mole, bench_offload, bench_parallel
from moekit.apps.cli.command import Group

COMMAND = Group(help="benchmarks (print a table, write JSON)",
                commands={"layer": bench_layer.COMMAND, "mole": bench_mole.COMMAND, "offload": bench_offload.COMMAND,
                          "parallel": bench_parallel.COMMAND})
