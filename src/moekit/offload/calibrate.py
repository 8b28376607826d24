"""Fiddler's rule measured on this machine: for how few tokens is an expert better computed where it
is stored (on the CPU) than loaded into the cache's device and computed there. ``server`` is the
:class:`~moekit.offload.runtime.ExpertServer` being calibrated (it calls :func:`calibrate`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from moekit.offload.store import LayerSpec

__all__ = ["calibrate"]


def _median_time(server, repeats: int, fn: Callable, *args) -> float:
    times = []
    for _ in range(repeats):
        server.sync()
        t0 = time.perf_counter()
        fn(*args)
        server.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layer_costs(server, layer: int, spec: LayerSpec, grid: list[int], repeats: int,
                 dtype: torch.dtype) -> dict:
    """The measured costs of one layer shape, with the first token count for which loading is no dearer."""
    t_load = _median_time(server, repeats, server.memory.read, layer, 0, 0)
    gen = torch.Generator().manual_seed(0)
    t_cache, t_host = [], []
    for n in grid:
        x = torch.randn(n, spec.d_model, generator=gen, dtype=dtype).to(server.device)
        t_cache.append(_median_time(server, repeats, lambda x=x: server.compute(layer, x, server.weights(layer, 0, 0))))
        t_host.append(_median_time(server, repeats, server.compute_where_stored, layer, x, 0))
    k = next((n for n, c, h in zip(grid, t_cache, t_host) if t_load + c <= h), 2 * grid[-1])
    return {"t_load": t_load, "tokens": grid, "t_cache": t_cache, "t_host": t_host, "threshold": k}


@torch.no_grad()
def calibrate(server, repeats: int = 7, max_tokens: int = 256, dtype: torch.dtype = torch.float32) -> dict:
    """For each layer shape, the median time to load an expert into the cache (``t_load``) and to
    compute it there for n = 1, 2, 4... ``max_tokens`` tokens (``t_cache``), against computing it on
    the CPU where it is stored (``t_host``, moving the rows there and back). ``threshold[layer]`` is
    the first n for which loading is no dearer: fewer tokens than that are computed where the expert
    is stored (past ``max_tokens``, ``2 * max_tokens``). ``dtype``: the model's activations'. Only
    before serving (it uses the first slot of each pool, which must be empty); its reads are not
    counted in the server's stats."""
    if server.cache.where or server.cache.stats.accesses or server.inflight:
        raise RuntimeError("ExpertServer.calibrate runs before serving (it overwrites the first slot of each pool); "
                           "build a new server with direct='cost' instead")
    grid = [1 << i for i in range(max(max_tokens, 1).bit_length()) if 1 << i <= max_tokens]
    by_spec: dict[LayerSpec, dict] = {}
    spent = server.read_s, server.exposed_s
    for layer, spec in enumerate(server.store.layers):
        if spec not in by_spec:
            by_spec[spec] = _layer_costs(server, layer, spec, grid, repeats, dtype)
    server.read_s, server.exposed_s = spent  # the calibration's streamed reads are not the run's
    layers = [by_spec[spec] for spec in server.store.layers]
    return {"device": str(server.device), "host": server.memory.host,
            "threshold": [x["threshold"] for x in layers], "layers": layers}
