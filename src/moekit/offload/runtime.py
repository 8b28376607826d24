"""Serving an MoE model whose experts stay on disk (or in host RAM): a byte-budgeted cache in front.

:func:`offload` swaps every MoE layer's :class:`~moekit.experts.GroupedExperts` for an
:class:`OffloadedExperts` that asks a shared :class:`ExpertServer` for the experts its tokens
need. The server owns the cache's memory (:class:`~moekit.offload.slab.SlabMemory`: the budget is
a real allocation that is never exceeded, ``server.resident_bytes()``), the prefetching thread
and the reads' accounting. A miss is loaded into a slot, or computed on the CPU where it is stored
(``direct``, :mod:`moekit.offload.kernels`); the bookkeeping is :class:`ExpertCache`, the same as
:func:`moekit.offload.simulate`'s, so a served run and a simulated run of the same access stream
give the same counters.

Every policy here is exact: an expert is always computed with its own weights, so the outputs are
the in-memory model's (each expert is one ``F.linear`` pair on its rows instead of one grouped
matmul: equal up to float summation order; greedy tokens identical, tested).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future as Future_
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.dispatch import LocalDispatcher, Segments
from moekit.experts import get_activation
from moekit.offload.cache import ExpertCache, check_direct, plan_pools, slots_for_budget
from moekit.offload.calibrate import calibrate
from moekit.offload.future import Future
from moekit.offload.kernels import expert_forward, int8_forward, streamed_forward
from moekit.offload.slab import SlabMemory
from moekit.offload.store import ExpertStore, moe_layers
from moekit.routers.pregate import PreGated

STREAM_BYTES = 16 << 10  # the buffer a miss computed from the store is streamed through

__all__ = ["STREAM_BYTES", "ExpertServer", "OffloadedExperts", "ServeStats", "attach", "budget_bytes", "offload",
           "open_store", "pregate_future"]


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
        self.low_threshold = low_threshold
        low_bytes = [s.low_bytes for s in store.layers]
        if low_threshold is not None and not store.low_bit:
            raise ValueError(f"low_threshold needs int8 copies: {store.folder} was written without them; rewrite it "
                             "with write_store(model, folder, low_bit=True)")
        self.low_buf = torch.empty(max(low_bytes) if low_threshold is not None else 0, dtype=torch.uint8)
        slots, pool_of = self._plan(budget_bytes - self.low_buf.numel(), partition, direct)
        self.budget_bytes = budget_bytes
        self.cache = ExpertCache(slots, L, self.expert_bytes, policy, future, window, low_bytes,
                                 None if direct == "cost" else direct, pool_of)
        self.acts = [get_activation(spec.activation) for spec in store.layers]
        widest = max(max(s.d_model, s.d_ff) for s in store.layers)
        streams = direct is not None and host == "disk"
        self.stream_buf = torch.empty(max(STREAM_BYTES // store.dtype.itemsize, widest) if streams else 0,
                                      dtype=store.dtype)
        self.row_weight: Tensor | None = None  # combine weight of each dispatched row (for low_threshold)
        self.future, self.prefetch = future, prefetch
        self.memory = SlabMemory(store, slots, self.cache.pool, self.device, host)
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

    def _plan(self, budget: int, partition: str, direct) -> tuple[list[int], list[list[int]] | None]:
        """``(slots per pool, pool of each expert)`` for ``budget`` bytes, and :attr:`expert_bytes`.
        Quantized experts are pooled by block size (:func:`plan_pools`), every slot of its experts' real
        bytes, with one buffer (``qbuf``, in the budget) for those computed from the store."""
        store = self.store
        if not store.quantized:
            self.expert_bytes = [store.expert_bytes(i) for i in range(len(store.layers))]
            self.qbuf = torch.empty(0, dtype=torch.uint8)
            return slots_for_budget(budget, self.expert_bytes, [s.num_experts for s in store.layers], partition), None
        if direct == "cost":
            raise ValueError("direct='cost' is not supported for a store of quantized experts; pass direct='future' "
                             "or an int")
        self.expert_bytes = [list(sizes) for sizes in store.sizes]
        quant = [max(n) for n, s in zip(store.sizes, store.layers) if s.quantized]
        plan = plan_pools(budget, store.sizes, partition, max(quant) if direct is not None else 0)
        self.qbuf = torch.empty(plan.scratch, dtype=torch.uint8)
        return plan.slots, plan.pool_of

    @property
    def slabs(self) -> list[Tensor]:
        """The cache's memory: one ``slots x block`` tensor per pool."""
        return self.memory.slabs

    def resident_bytes(self) -> int:
        """Bytes of expert weights held in the cache's memory (the slabs, the int8 buffer and the buffer of
        quantized experts computed from the store)."""
        return self.memory.resident_bytes() + self.low_buf.numel() + self.qbuf.numel()

    def compute(self, layer: int, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        """One expert of ``layer`` with weights ``w`` (a block's parts) on rows ``x``."""
        return expert_forward(self.acts[layer], x, w)

    def compute_where_stored(self, layer: int, x: Tensor, expert: int) -> Tensor:
        """The expert computed on the CPU where it is stored (the host copy, or streamed from the
        store through the small buffer; only the reads count as read time), nothing admitted; ``x``
        and the result stay on ``x``'s device."""
        xc = x if x.device.type == "cpu" else x.cpu()
        if self.memory.host_parts is not None:
            y = self.compute(layer, xc, self.memory.host_parts[layer][expert])
        elif self.store.layers[layer].quantized:  # a packed block is small: read whole into the buffer
            t0 = time.perf_counter()
            self.store.read(layer, expert, self.qbuf)
            dt = time.perf_counter() - t0
            self.read_s += dt
            self.exposed_s += dt
            y = self.compute(layer, xc, self.memory.split(layer, expert, self.qbuf))
        else:
            chunks = self.store.stream(layer, expert, self.stream_buf)
            y, reading = streamed_forward(self.store.layers[layer], self.acts[layer], xc, chunks)
            self.read_s += reading
            self.exposed_s += reading
        return y if y.device == x.device else y.to(x.device)

    def compute_int8(self, layer: int, x: Tensor, expert: int) -> Tensor:
        """The expert computed from its int8 copy, read into the small int8 buffer (nothing admitted)."""
        t0 = time.perf_counter()
        p = self.store.read_low(layer, expert, self.low_buf)
        dt = time.perf_counter() - t0
        self.read_s += dt
        self.exposed_s += dt
        return int8_forward(self.acts[layer], x, p)

    def sync(self) -> None:
        """Wait for the cache's device (a GPU's queued kernels)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def calibrate(self, repeats: int = 7, max_tokens: int = 256, dtype: torch.dtype = torch.float32) -> dict:
        """Fiddler's rule measured on this machine (:func:`moekit.offload.calibrate.calibrate`)."""
        return calibrate(self, repeats, max_tokens, dtype)

    def _wait(self, pool: int, slot: int) -> None:
        fut = self.inflight.pop((pool, slot), None)
        if fut is not None:
            t0 = time.perf_counter()
            try:
                self.read_s += fut.result()
            except BaseException:
                self.cache.drop(pool, slot)  # the prefetched expert never arrived: not resident
                raise
            self.exposed_s += time.perf_counter() - t0

    def _load(self, layer: int, expert: int, slot: int) -> None:
        """A demand miss: read now (after any prefetch still writing that slot)."""
        self._wait(self.cache.pool(layer, expert), slot)
        dt = self.memory.read(layer, expert, slot)
        self.read_s += dt
        self.exposed_s += dt

    def _submit(self, layer: int, expert: int, slot: int) -> None:
        pool = self.cache.pool(layer, expert)
        self._wait(pool, slot)
        self.inflight[(pool, slot)] = self.executor.submit(self.memory.read, layer, expert, slot)

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

    def weights(self, layer: int, expert: int, slot: int) -> dict:
        """The parts of ``expert`` of ``layer`` in ``slot`` of its pool (views, made once per slot and
        layer shape), once its read is done."""
        self._wait(self.cache.pool(layer, expert), slot)
        return self.memory.parts(layer, expert, slot)

    def drain(self) -> None:
        """Wait for every read in flight (a failed one leaves its expert not resident, and raises)."""
        failed = None
        for pool, slot in list(self.inflight):
            fut = self.inflight.pop((pool, slot))
            try:
                self.read_s += fut.result()
            except Exception as e:  # noqa: PERF203 - every read must be accounted for
                self.cache.drop(pool, slot)
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
                out[rows] = server.compute_int8(self.layer, x_ND[rows], e)
            elif slot == "store":
                out[rows] = server.compute_where_stored(self.layer, x_ND[rows], e)
            else:
                out[rows] = server.compute(self.layer, x_ND[rows], server.weights(self.layer, e, slot))

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


class _WeightKeeper(LocalDispatcher):
    """The local dispatcher, keeping the combine weight of each dispatched row for the experts."""

    def __init__(self, server: ExpertServer) -> None:
        self.server = server

    def dispatch(self, x_TD: Tensor, routing):
        x_ND, seg, ctx = super().dispatch(x_TD, routing)
        self.server.row_weight = ctx.weight_N
        return x_ND, seg, ctx


def open_store(store: ExpertStore | str | os.PathLike) -> ExpertStore:
    return store if isinstance(store, ExpertStore) else ExpertStore(store)


def budget_bytes(budget: float | int, store: ExpertStore) -> int:
    """A budget given as a fraction of the store's experts' bytes (``<= 1``) or as bytes, in bytes."""
    if not budget > 0:
        raise ValueError(f"offload: budget must be > 0 (a fraction of the experts' bytes, or bytes), got {budget!r}")
    return int(budget * store.total_bytes()) if budget <= 1 else int(budget)  # 1.0 is 100%, not one byte


def attach(server: ExpertServer, layers: list[nn.Module]) -> None:
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
    store = open_store(store)
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
    server = ExpertServer(store, budget_bytes(budget, store), policy, partition, window, future, prefetch,
                          low_threshold, direct, device, host, dtype)
    attach(server, layers)
    return server
