"""Serving an MoE model whose experts stay on disk (or in host RAM): a byte-budgeted cache in front.

:func:`offload` swaps every MoE layer's :class:`~moekit.experts.GroupedExperts` for an
:class:`OffloadedExperts` that asks a shared :class:`ExpertServer` for the experts its tokens
need. The server owns the cache's memory: one preallocated slab per pool, ``slots x block``
elements, allocated once on the cache's device (the CPU, or a GPU in front of host memory), so
the budget is a real allocation that is never exceeded (``server.resident_bytes()``). A miss
reads the expert's block from the store straight into its slot (``preadv``; through a pinned
buffer for a GPU, or copied from host RAM with ``host="ram"``), or is computed on the CPU where
it is stored (``direct``); the bookkeeping is :class:`ExpertCache`, the same as
:func:`moekit.offload.simulate`'s, so a served run and a simulated run of the same access stream
give the same counters.

Every policy here is exact: an expert is always computed with its own weights, so the outputs are
the in-memory model's (each expert is one ``F.linear`` pair on its rows instead of one grouped
matmul: equal up to float summation order; greedy tokens identical, tested).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future as Future_
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.dispatch import LocalDispatcher, Segments
from moekit.experts import get_activation
from moekit.io import check_target, kind_of, read_json, verify
from moekit.offload.cache import ExpertCache, Future, check_direct, slots_for_budget
from moekit.offload.store import STORE_KIND, ExpertStore, LayerSpec, moe_layers

STREAM_BYTES = 16 << 10  # the buffer a miss computed from the store is streamed through

__all__ = ["ExpertServer", "OffloadedExperts", "ServeStats", "load_offloaded", "offload", "pregate_future"]


@dataclass
class ServeStats:
    """What a served run cost: the cache's counters plus measured reads and time."""

    tokens: int
    accesses: int
    hits: int
    misses: int  # demand loads
    prefetched: int  # loads issued ahead of use
    low_bit: int  # misses served by the int8 copy
    direct: int  # misses computed straight from the store (not admitted)
    bytes_loaded: int
    bytes_read: int  # what the store read from disk (bytes_loaded when host="disk"; 0 with host="ram")
    read_s: float  # time spent reading, demand and prefetch
    exposed_s: float  # time the forward waited for reads (demand reads + waits for in-flight prefetches)
    hit_rate: float
    loads_per_token: float
    bytes_per_token: float
    prefetch_precision: float
    prefetch_recall: float
    resident_bytes: int
    budget_bytes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ExpertServer:
    """The cache, its memory and the store behind it (shared by every :class:`OffloadedExperts`).

    Args:
        store: the opened :class:`ExpertStore`.
        budget_bytes: bytes of expert weights held in RAM.
        policy, partition, window, future: see :class:`ExpertCache` and :func:`slots_for_budget`.
        prefetch: ``None``; ``"future"``: while a layer computes, a background thread loads the
            experts of the next access known from ``future`` (exact: a PreGate's routing or a
            recorded trace), if it lies within ``window`` tokens; ``"gate"``: the next layer's
            router applied to this layer's input predicts them (mixtral-offloading, AdapMoE;
            within a token only).
        low_threshold: mixed precision (HOBBIT): a miss of an expert whose largest gate weight in
            the batch is below this is computed from its int8 copy (read into one small buffer,
            not cached, evicting nothing); needs a store written with ``low_bit=True``. The buffer
            comes out of the budget.
        direct: when a miss is computed where the expert is stored (on the CPU) instead of loaded
            into the cache (evicting nothing): ``"future"`` (Belady's rule with bypass: the known
            future needs it after every expert it could evict; needs ``future``), an int ``k`` or
            one per layer (Fiddler's rule: fewer than ``k`` tokens need it and no slot is free), or
            ``"cost"``: Fiddler's rule with each layer's ``k`` measured at start-up
            (:meth:`calibrate`: loading an expert into ``device`` memory and computing it there,
            against computing it on the CPU, for 1, 2, 4... tokens). From disk the expert is
            streamed through a fixed buffer of ``STREAM_BYTES`` (not counted in the budget, like the
            reads' own I/O buffers): it reads the same bytes as a load.
        device: where the cache lives and the experts it holds are computed (default the CPU;
            ``"cuda"``: a GPU cache, the model must run there too).
        host: where the experts are stored: ``"disk"`` (the store, read on every load) or
            ``"ram"`` (every expert read once into host memory: the setting of mixtral-offloading
            and Fiddler, where host RAM holds the model and the GPU budget is the constraint).
        compute_dtype: the activations' dtype, for :meth:`calibrate`.

    Prefetching is a separate decision from ``direct``: a prefetched expert is always admitted.
    The int8 buffer of ``low_threshold`` is host memory but counted in the budget.
    """

    def __init__(self, store: ExpertStore, budget_bytes: int, policy: str = "lru", partition: str = "layer",
                 window: float = math.inf, future: Future | None = None, prefetch: str | None = None,
                 low_threshold: float | None = None, direct: str | int | Sequence[int] | None = None,
                 device: str | torch.device | None = None, host: str = "disk",
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device if device is not None else "cpu")
        if self.device.type not in ("cpu", "cuda", "meta"):
            raise ValueError(f"device: the expert cache supports 'cpu' and 'cuda', got {self.device}")
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" is the current one: compare as cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        if host not in ("disk", "ram"):
            raise ValueError(f"host: unknown value {host!r}; valid values are 'disk', 'ram'")
        if direct == "cost" and self.device.type == "cpu" and host == "disk":
            raise ValueError("direct='cost' weighs moving an expert into the cache's device against computing it on the "
                             "CPU where it is stored; with device='cpu' and host='disk' both read the same bytes on the "
                             "same cores. Pass device='cuda' or host='ram', or direct='future' / an int")
        check_direct(None if direct == "cost" else direct, future, len(store.layers))
        if prefetch not in (None, "future", "gate"):
            raise ValueError(f"prefetch: unknown value {prefetch!r}; valid values are None, 'future', 'gate'")
        if prefetch == "future" and future is None:
            raise ValueError("prefetch='future' needs future=Future(accesses) (a PreGate's routing or a recorded trace)")
        self.store = store
        L = len(store.layers)
        self.expert_bytes = [store.expert_bytes(i) for i in range(L)]
        self.low_threshold = low_threshold
        low_bytes = [s.low_bytes for s in store.layers]
        if low_threshold is not None and not store.low_bit:
            raise ValueError(f"low_threshold needs int8 copies: {store.folder} was written without them; rewrite it "
                             "with write_store(model, folder, low_bit=True)")
        self.low_buf = torch.empty(max(low_bytes) if low_threshold is not None else 0, dtype=torch.uint8)
        slots = slots_for_budget(budget_bytes - self.low_buf.numel(), self.expert_bytes,
                                 [s.num_experts for s in store.layers], partition)
        self.budget_bytes = budget_bytes
        self.cache = ExpertCache(slots, L, self.expert_bytes, policy, future, window, low_bytes,
                                 None if direct == "cost" else direct)
        self.acts = [get_activation(spec.activation) for spec in store.layers]
        widest = max(max(s.d_model, s.d_ff) for s in store.layers)
        streams = direct is not None and host == "disk"
        self.stream_buf = torch.empty(max(STREAM_BYTES // store.dtype.itemsize, widest) if streams else 0,
                                      dtype=store.dtype)
        # pageable host memory: the pinned allocator would round every block up to a power of two
        self.host_blocks = None if host == "disk" else [
            [store.read(i, e, torch.empty(spec.numel, dtype=store.dtype)) for e in range(spec.num_experts)]
            for i, spec in enumerate(store.layers)]
        self.host_parts = None if host == "disk" else [  # views, made once
            [spec.split(block) for block in blocks] for spec, blocks in zip(store.layers, self.host_blocks)]
        self.staging = threading.local()  # disk -> pinned host buffer -> GPU, one buffer per reading thread
        self.views: dict[tuple[LayerSpec, int, int], dict[str, Tensor]] = {}
        self.row_weight: Tensor | None = None  # combine weight of each dispatched row (for low_threshold)
        self.future, self.prefetch = future, prefetch
        pools = range(len(slots))
        width = [max(store.layers[i].numel for i in range(L) if self.cache.pool_of(i) == p) for p in pools]
        self.slabs = [torch.empty(n, w, dtype=store.dtype, device=self.device) for n, w in zip(slots, width)]
        self.inflight: dict[tuple[int, int], Future_] = {}  # (pool, slot) -> read in progress
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="moekit-prefetch") if prefetch else None
        self.moes: list[nn.Module] = []  # set by offload(): the routers predict the next layer
        self.x: Tensor | None = None  # the running MoE layer's input (for prefetch="gate")
        self.read_s = 0.0
        self.exposed_s = 0.0
        self.costs: dict | None = None
        if direct == "cost":
            self.costs = self.calibrate(dtype=compute_dtype)
            self.cache.direct = self.costs["threshold"]
        self.bytes_read0 = store.bytes_read
        self.tokens = 0

    def resident_bytes(self) -> int:
        """Bytes of expert weights held in the cache's memory (the slabs and the int8 buffer)."""
        return sum(s.numel() * s.element_size() for s in self.slabs) + self.low_buf.numel()

    def _read(self, layer: int, expert: int, slot: int) -> float:
        """Load an expert into a slot: from the host copy, or read from the store (straight into the
        slot on the CPU, through a pinned buffer for a GPU). Returns the seconds it took."""
        t0 = time.perf_counter()
        n = self.store.layers[layer].numel
        dst = self.slabs[self.cache.pool_of(layer)][slot]
        if self.host_blocks is not None:
            dst[:n].copy_(self.host_blocks[layer][expert])
        elif self.device.type == "cpu":
            self.store.read(layer, expert, dst)
        else:
            buf = getattr(self.staging, "buf", None)
            if buf is None:  # sized for the largest block of any layer
                buf = self.staging.buf = torch.empty(max(s.numel for s in self.store.layers), dtype=self.store.dtype,
                                                     pin_memory=True)
            dst[:n].copy_(self.store.read(layer, expert, buf)[:n])  # synchronous: the pinned buffer is reused
        return time.perf_counter() - t0

    def compute(self, layer: int, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        """One expert of ``layer`` with weights ``w`` (a block's parts) on rows ``x``."""
        dt = x.dtype
        h = F.linear(x, w["first"].to(dt), w["first_bias"].to(dt) if "first_bias" in w else None)
        return F.linear(self.acts[layer].apply(h), w["down"].to(dt), w["down_bias"].to(dt) if "down_bias" in w else None)

    def compute_where_stored(self, layer: int, x: Tensor, expert: int) -> Tensor:
        """The expert computed on the CPU where it is stored (the host copy, or streamed from the
        store), nothing admitted; ``x`` and the result stay on ``x``'s device."""
        xc = x if x.device.type == "cpu" else x.cpu()
        if self.host_parts is not None:
            y = self.compute(layer, xc, self.host_parts[layer][expert])
        else:
            y = self._streamed(layer, xc, expert)
        return y if y.device == x.device else y.to(x.device)

    def _streamed(self, layer: int, x: Tensor, expert: int) -> Tensor:
        """The expert computed straight from the store, streamed a few rows at a time through the
        small buffer (its own weights: equal to a loaded expert's output up to float summation
        order). Works on transposed activations so every chunk's product is written in place into
        contiguous rows. Only the reads count as read time."""
        spec, dt = self.store.layers[layer], x.dtype
        x_T = x.T.contiguous()
        h_T = x.new_empty(spec.first_out, x.shape[0])
        y_T = x.new_empty(spec.d_model, x.shape[0])
        a_T = bias = None
        chunks = self.store.stream(layer, expert, self.stream_buf)
        reading = 0.0
        while True:
            t0 = time.perf_counter()
            part, r, w = next(chunks, (None, 0, None))
            reading += time.perf_counter() - t0
            if part is None:
                break
            w = w if w.dtype == dt else w.to(dt)
            if part == "first":
                torch.mm(w, x_T, out=h_T[r: r + w.shape[0]])
            elif part == "bias":  # its own small tensor, not the reused buffer
                h_T += w[: spec.first_out, None]
                bias = w[spec.first_out:, None]
            else:
                if a_T is None:
                    a_T = self.acts[layer].apply(h_T.T).T.contiguous()
                torch.mm(w, a_T, out=y_T[r: r + w.shape[0]])
        self.read_s += reading
        self.exposed_s += reading
        return (y_T if bias is None else y_T + bias).T

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def calibrate(self, repeats: int = 7, max_tokens: int = 256, dtype: torch.dtype = torch.float32) -> dict:
        """Fiddler's rule, measured on this machine: for each layer shape, the median time to load an
        expert into the cache (``t_load``) and to compute it there for n = 1, 2, 4... ``max_tokens``
        tokens (``t_cache``), against computing it on the CPU where it is stored (``t_host``, moving
        the rows there and back). ``threshold[layer]`` is the first n for which loading is no
        dearer: fewer tokens than that are computed where the expert is stored (past ``max_tokens``,
        ``2 * max_tokens``). ``dtype``: the model's activations'. Only before serving (it uses the
        first slot of each pool, which must be empty); its reads are not counted in the stats."""
        import statistics

        if self.cache.where or self.cache.stats.accesses or self.inflight:
            raise RuntimeError("ExpertServer.calibrate runs before serving (it overwrites the first slot of each pool); "
                               "build a new server with direct='cost' instead")

        def median_time(fn, *args) -> float:
            times = []
            for _ in range(repeats):
                self._sync()
                t0 = time.perf_counter()
                fn(*args)
                self._sync()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        grid = [1 << i for i in range(max(max_tokens, 1).bit_length()) if 1 << i <= max_tokens]
        by_spec: dict[LayerSpec, dict] = {}
        spent = self.read_s, self.exposed_s
        for layer, spec in enumerate(self.store.layers):
            if spec in by_spec:
                continue
            t_load = median_time(self._read, layer, 0, 0)
            gen = torch.Generator().manual_seed(0)
            t_cache, t_host = [], []
            for n in grid:
                x = torch.randn(n, spec.d_model, generator=gen, dtype=dtype).to(self.device)
                t_cache.append(median_time(lambda x=x, layer=layer: self.compute(layer, x, self.weights(layer, 0))))
                t_host.append(median_time(self.compute_where_stored, layer, x, 0))
            k = next((n for n, c, h in zip(grid, t_cache, t_host) if t_load + c <= h), 2 * grid[-1])
            by_spec[spec] = {"t_load": t_load, "tokens": grid, "t_cache": t_cache, "t_host": t_host, "threshold": k}
        self.read_s, self.exposed_s = spent  # the calibration's streamed reads are not the run's
        layers = [by_spec[spec] for spec in self.store.layers]
        return {"device": str(self.device), "host": "ram" if self.host_blocks is not None else "disk",
                "threshold": [x["threshold"] for x in layers], "layers": layers}

    def _wait(self, layer: int, slot: int) -> None:
        fut = self.inflight.pop((self.cache.pool_of(layer), slot), None)
        if fut is not None:
            t0 = time.perf_counter()
            try:
                self.read_s += fut.result()
            except BaseException:
                self.cache.drop(layer, slot)  # the prefetched expert never arrived: not resident
                raise
            self.exposed_s += time.perf_counter() - t0

    def _load(self, layer: int, expert: int, slot: int) -> None:
        """A demand miss: read now (after any prefetch still writing that slot)."""
        self._wait(layer, slot)
        dt = self._read(layer, expert, slot)
        self.read_s += dt
        self.exposed_s += dt

    def _submit(self, layer: int, expert: int, slot: int) -> None:
        self._wait(layer, slot)
        self.inflight[(self.cache.pool_of(layer), slot)] = self.executor.submit(self._read, layer, expert, slot)

    def _issue_prefetch(self, layer: int, needed: list[int]) -> None:
        """Before ``layer`` computes ``needed``: start loading what the next access will need."""
        if self.prefetch == "future":
            t = self.cache.t + 2  # cache.t is the previous access; this one is t + 1
            if t >= self.future.length or self.future.tokens[t] - self.future.tokens[t - 1] >= self.cache.window:
                return
            nxt_layer, nxt = self.future.accesses[t]
        else:
            nxt_layer = layer + 1
            if nxt_layer >= len(self.moes) or self.x is None:
                return  # the next token's layer 0 depends on a token not sampled yet
            r = self.moes[nxt_layer].gate(self.x)
            nxt = torch.unique(r.expert[r.weight != 0]).tolist()
        self.cache.prefetch(nxt_layer, nxt, self._submit, protect={(layer, e) for e in needed})

    def weights(self, layer: int, slot: int) -> dict[str, Tensor]:
        """The parts of the expert in ``slot`` of ``layer``'s pool (views, made once per slot and
        layer shape), once its read is done."""
        self._wait(layer, slot)
        spec = self.store.layers[layer]
        views = self.views.get((spec, self.cache.pool_of(layer), slot))
        if views is None:
            views = self.views[spec, self.cache.pool_of(layer), slot] = spec.split(
                self.slabs[self.cache.pool_of(layer)][slot])
        return views

    def drain(self) -> None:
        """Wait for every read in flight (a failed one leaves its expert not resident, and raises)."""
        failed = None
        for pool, slot in list(self.inflight):
            fut = self.inflight.pop((pool, slot))
            try:
                self.read_s += fut.result()
            except Exception as e:  # noqa: PERF203 - every read must be accounted for
                layer = next(i for i in range(len(self.expert_bytes)) if self.cache.pool_of(i) == pool)
                self.cache.drop(layer, slot)
                failed = failed or e
        if failed is not None:
            raise failed

    def stats(self) -> ServeStats:
        self.drain()
        st = self.cache.stats
        tokens = max(self.tokens, 1)
        return ServeStats(self.tokens, st.accesses, st.hits, st.misses, st.prefetched, st.low_bit, st.direct,
                          st.bytes_loaded,
                          self.store.bytes_read - self.bytes_read0, self.read_s, self.exposed_s, st.hit_rate,
                          st.loads / tokens, st.bytes_loaded / tokens, st.prefetch_precision, st.prefetch_recall,
                          self.resident_bytes(), self.budget_bytes)

    def close(self) -> None:
        self.drain()
        if self.executor is not None:
            self.executor.shutdown()


class OffloadedExperts(nn.Module):
    """Drop-in for ``GroupedExperts``: the weights come from the server's cache (inference only)."""

    def __init__(self, server: ExpertServer, layer: int) -> None:
        super().__init__()
        spec = server.store.layers[layer]
        self.server, self.layer = server, layer
        self.spec = spec
        self.num_experts, self.d_model, self.d_ff = spec.num_experts, spec.d_model, spec.d_ff
        self.activation = spec.activation

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"

    def forward(self, x_ND: Tensor, seg: Segments) -> Tensor:
        if torch.is_grad_enabled() and x_ND.requires_grad:
            raise RuntimeError("OffloadedExperts serves inference only; run under torch.no_grad() (train the "
                               "in-memory model, then write a new store)")
        starts = [0]
        for n in seg.sizes:
            starts.append(starts[-1] + n)
        if x_ND.device != self.server.device:
            raise RuntimeError(f"the model runs on {x_ND.device}, the expert cache is on {self.server.device}; move the "
                               f"model there (model.to('{self.server.device}')) or serve with device='{x_ND.device}'")
        out = x_ND.new_empty(x_ND.shape[0], self.d_model)
        server = self.server

        def use(e: int, slot: int | str) -> None:
            rows = slice(starts[e], starts[e + 1])
            if slot == "int8":
                out[rows] = self._low_bit(x_ND[rows], e)
            elif slot == "store":
                out[rows] = server.compute_where_stored(self.layer, x_ND[rows], e)
            else:
                out[rows] = server.compute(self.layer, x_ND[rows], server.weights(self.layer, slot))

        needed = [e for e, n in enumerate(seg.sizes) if n]
        low: list[int] = []
        if self.server.low_threshold is not None and self.server.row_weight is not None:
            w = self.server.row_weight.detach().float()
            low = [e for e in needed if float(w[starts[e]: starts[e + 1]].abs().max()) < self.server.low_threshold]
        if self.server.prefetch:
            self.server._issue_prefetch(self.layer, needed)
        counts = [seg.sizes[e] for e in needed] if isinstance(server.cache.direct, (int, list)) else None
        server.cache.access(self.layer, needed, server._load, use, low=low, tokens=counts)
        return out

    def _low_bit(self, x: Tensor, e: int, chunk: int = 256) -> Tensor:
        """The expert from its int8 copy, dequantised ``chunk`` output rows at a time (small scratch)."""
        t0 = time.perf_counter()
        p = self.server.store.read_low(self.layer, e, self.server.low_buf)
        dt = time.perf_counter() - t0
        self.server.read_s += dt
        self.server.exposed_s += dt

        def linear(inp: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
            y = inp.new_empty(inp.shape[0], q.shape[0])
            for i in range(0, q.shape[0], chunk):
                w = q[i: i + chunk].to(inp.device, inp.dtype) * scale[i: i + chunk, None].to(inp.device, inp.dtype)
                y[:, i: i + chunk] = inp @ w.T
            return y if bias is None else y + bias.to(inp.device, inp.dtype)

        h = linear(x, p["first"], p["first_scale"], p.get("first_bias"))
        return linear(self.server.acts[self.layer].apply(h), p["down"], p["down_scale"], p.get("down_bias"))


class _WeightKeeper(LocalDispatcher):
    """The local dispatcher, keeping the combine weight of each dispatched row for the experts."""

    def __init__(self, server: ExpertServer) -> None:
        self.server = server

    def dispatch(self, x_TD: Tensor, routing):
        x_ND, seg, ctx = super().dispatch(x_TD, routing)
        self.server.row_weight = ctx.weight_N
        return x_ND, seg, ctx


def _open(store: ExpertStore | str | os.PathLike) -> ExpertStore:
    return store if isinstance(store, ExpertStore) else ExpertStore(store)


def _budget_bytes(budget: float | int, store: ExpertStore) -> int:
    if not budget > 0:
        raise ValueError(f"offload: budget must be > 0 (a fraction of the experts' bytes, or bytes), got {budget!r}")
    return int(budget * store.total_bytes()) if budget <= 1 else int(budget)  # 1.0 is 100%, not one byte


def _attach(server: ExpertServer, layers: list[nn.Module]) -> None:
    """Swap each MoE layer's experts for the server's, with the hooks the server needs."""
    server.moes = layers
    for i, moe in enumerate(layers):
        moe.experts = OffloadedExperts(server, i)
        if server.low_threshold is not None:
            moe.dispatcher = _WeightKeeper(server)

    def count(mod, args):
        server.tokens += args[0].numel() // mod.d_model

    def keep_input(mod, args):
        server.x = args[0].reshape(-1, mod.d_model)

    server.hooks = [layers[0].register_forward_pre_hook(count)]
    if server.prefetch == "gate" and any(getattr(m.gate, "context_keys", ()) for m in layers):
        raise ValueError("prefetch='gate' applies the next layer's router to this layer's input, but these routers "
                         "need context (token ids, pre-gated expert ids...); use prefetch='future' (with "
                         "future='pregate' for a PreGate model) or no prefetch")
    if server.prefetch == "gate":
        server.hooks += [m.register_forward_pre_hook(keep_input) for m in layers]


def pregate_future(model: nn.Module, layers: list[nn.Module]) -> Future:
    """A :class:`Future` that the model's PreGate (Read-ME) fills as it routes: every forward first
    routes its tokens for all layers, which appends that forward's accesses before the backbone runs,
    so Belady's lookahead and ``prefetch="future"`` act on exact knowledge while generating."""
    from moekit.routers.pregate import PreGated

    gate = getattr(model, "pregate", None)
    if gate is None or not all(isinstance(m.gate, PreGated) for m in layers):
        raise ValueError("future='pregate' needs a model whose every MoE layer is routed by its PreGate (a moekit GPT "
                         "with GPTConfig.pregate, e.g. from moekit.convert.refactor); pass a Future otherwise")
    future = Future([])
    route = gate.route
    forwards = iter(range(1 << 62))

    def routed(ids_BT: Tensor, cache: dict | None = None) -> Tensor:
        expert_ids = route(ids_BT, cache)
        experts = sorted(set(expert_ids.reshape(-1).tolist()))
        t = next(forwards)
        future.extend([(layer, experts) for layer in range(len(layers))], [t] * len(layers))
        return expert_ids

    gate.route = routed
    return future


def offload(model: nn.Module, store: ExpertStore | str, budget: float | int = 0.25, policy: str = "lru",
            partition: str = "layer", window: float = math.inf, future: Future | str | None = None,
            prefetch: str | None = None, low_threshold: float | None = None,
            direct: str | int | Sequence[int] | None = None, device: str | torch.device | None = None,
            host: str = "disk", check: bool = True) -> ExpertServer:
    """Serve ``model``'s experts from ``store`` through a cache of ``budget`` (a fraction of all
    experts' bytes if ``<= 1``, else bytes), in place: every MoE layer's experts are replaced (their
    memory is freed once nothing else holds them). Returns the :class:`ExpertServer` (counters:
    ``server.stats()``). ``check`` verifies the store was written from this model.
    ``future``: the known future for ``policy="belady"`` and ``prefetch="future"``: a
    :class:`Future` (e.g. of a recorded trace) or ``"pregate"`` (filled by the model's PreGate).
    ``direct``, ``device``, ``host``: see :class:`ExpertServer` (the model must run on ``device``,
    which defaults to the device of the model's parameters: ``offload(model.cuda(), ...)`` caches
    on the GPU)."""
    store = _open(store)
    layers = moe_layers(model)
    if isinstance(future, str):
        if future != "pregate":
            raise ValueError(f"future: unknown value {future!r}; pass a Future or 'pregate'")
        future = pregate_future(model, layers)
    if check:
        store.check_model(model)
    elif len(layers) != len(store.layers):
        raise ValueError(f"{store.folder}: {len(store.layers)} layers, the model has {len(layers)} MoE layers")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if device is None:  # the cache sits beside the model's other weights
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    server = ExpertServer(store, _budget_bytes(budget, store), policy, partition, window, future, prefetch,
                          low_threshold, direct, device, host, dtype)
    _attach(server, layers)
    return server


def _stale(folder: Path, stamp: dict, low_bit: bool) -> bool:
    """Whether the store in ``folder`` must be written again: missing, damaged, written from another
    version of the checkpoint, or without the int8 copies asked for."""
    if kind_of(folder) != STORE_KIND:
        return True
    try:
        verify(folder, STORE_KIND, "")
        m = read_json(folder / "manifest.json")
    except (OSError, ValueError):
        return True
    return m.get("source") != stamp or (low_bit and not m.get("low_bit"))


def load_offloaded(path: str | os.PathLike, store: ExpertStore | str | os.PathLike | None = None,
                   budget: float | int = 0.25, low_bit: bool = False, **kw):
    """``(model, server)``: a moekit GPT saved by ``GPT.save`` at ``path``, served with its experts
    on disk; the expert weights are never loaded into RAM (they are built on the meta device and
    only the other tensors are read from the safetensors file, verified against its checksum
    first). ``store`` defaults to ``path/experts``, written from the checkpoint (with int8 copies
    if ``low_bit``) when missing, damaged or older than the checkpoint. A ``store`` folder given
    explicitly is written only if it does not exist (or is empty); an existing folder that is not
    an expert store is refused, never replaced. Other keyword arguments go to :func:`offload`."""
    from safetensors import safe_open

    from moekit.experts import experts_on_meta
    from moekit.models import GPT
    from moekit.models.gpt import WEIGHTS_FILE, read_config, verify_model
    from moekit.offload.store import write_store

    path = Path(path)
    man = verify_model(path)
    cfg = read_config(path)
    stamp = {"checkpoint": str((path / WEIGHTS_FILE).resolve()), "sha256": man["files"][WEIGHTS_FILE]["sha256"]}
    own = store is None  # path/experts is derived from the checkpoint: rebuilt whenever the checkpoint changes
    folder = Path(store.folder if isinstance(store, ExpertStore) else store or path / "experts")
    want_low = low_bit or kw.get("low_threshold") is not None
    if not isinstance(store, ExpertStore):
        exists = check_target(folder, STORE_KIND, "expert store")  # anything else there is refused, untouched
        if not exists or (own and _stale(folder, stamp, want_low)):
            write_store(GPT.load(path), folder, low_bit=want_low, source=stamp)
    store = _open(store if isinstance(store, ExpertStore) else folder)
    if store.source and store.source.get("checkpoint") == stamp["checkpoint"] and store.source != stamp:
        raise ValueError(f"{store.folder}: written from an older version of {path / WEIGHTS_FILE}; write it again "
                         "(moekit.offload.write_store) or leave store=None to have it rebuilt")
    with experts_on_meta():
        model = GPT(cfg)
    layers = moe_layers(model)
    specs = [LayerSpec.of(m) for m in layers]  # shapes only: the meta tensors know them
    if specs != store.layers:
        raise ValueError(f"{store.folder}: written for another model (expert shapes {store.layers} vs the model's "
                         f"{specs} at {path}); write a store from this model with moekit.offload.write_store")
    if kw.get("future") == "pregate":
        kw["future"] = pregate_future(model, layers)
    server = ExpertServer(store, _budget_bytes(budget, store), **kw)
    _attach(server, layers)
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        state = {}
        for n in model.state_dict():
            src = n if n in keys else "head.weight" if n == "embed.weight" else "embed.weight"
            if src not in keys:
                raise ValueError(f"{path / WEIGHTS_FILE}: no tensor {n!r}; was it written by GPT.save for this config?")
            state[n] = f.get_tensor(src)
    model.load_state_dict(state, strict=True)
    store.check_model(model)
    return model.to(server.device).eval(), server
