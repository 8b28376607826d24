"""`moekit bench mole`: MoLE's claim — decode at dense speed with experts on disk — measured.

Four demo-sized models of equal inference FLOPs (same attention, same dense/shared FFN width):
(a) dense; (b) top-2 MoE with every expert in RAM; (c) the same MoE with its experts in an expert
store (:mod:`moekit.offload`), each expert a contiguous block read when a token needs it (no
cache); (d) MoLE with its lookup table on disk, each record checked against its CRC-32 as it is
read (and (d'), the same with the check off, to measure its cost). For (c) and (d) every read is a
real read: before each ``pread`` the byte range is dropped from the OS page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (clean pages are evicted, so the read goes to the device;
:mod:`moekit.ops.uncached`). Each model runs in its own spawned process so that its peak RSS is its
own, and loads only what it keeps in memory: the MoE on disk and MoLE never materialise their
experts. "RSS (model)" is the peak RSS minus the RSS after importing torch. Weights are random:
only speed, memory and bytes moved are measured here.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from moekit.apps.bench.timing import interleaved_medians, peak_rss_mb, rss_mb
from moekit.dispatch import Segments
from moekit.experts import get_activation
from moekit.io import atomic_write_text, dumps
from moekit.models import GPT, GPTConfig
from moekit.models.loading import load_without_experts
from moekit.models.mole import load_served, reparameterize
from moekit.offload import ExpertStore, moe_layers, write_store
from moekit.offload.kernels import expert_forward
from moekit.ops.uncached import drop_page_cache, pread_exact

#: ``mole-disk`` checks every record it reads against its CRC-32 (moekit's default);
#: ``mole-disk-unchecked`` is the same model with the check off, to measure what the check costs
CONFIGS = ("dense", "moe-ram", "moe-disk", "mole-disk", "mole-disk-unchecked")


class StoreExperts(nn.Module):
    """One MoE layer's experts read from an expert store whenever a token needs them (no cache: every
    needed expert is one read of its block, then computed)."""

    def __init__(self, store: ExpertStore, layer: int) -> None:
        super().__init__()
        self.store, self.layer, self.spec = store, layer, store.layers[layer]
        self.act, self.d_model = get_activation(self.spec.activation), self.spec.d_model
        self.buf = torch.empty(self.spec.numel, dtype=store.dtype)

    def forward(self, x_ND: Tensor, seg: Segments) -> Tensor:
        out, start = x_ND.new_empty(x_ND.shape[0], self.d_model), 0
        for e, n in enumerate(seg.sizes):
            if n:
                w = self.spec.split(self.store.read(self.layer, e, self.buf))
                out[start: start + n] = expert_forward(self.act, x_ND[start: start + n], w)
                start += n
        return out


def _base(vocab: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, d_ff=512)


def _prepare(folder: Path, vocab: int) -> None:
    """Build every model once (same seed) and write what each configuration loads."""
    base = _base(vocab)
    torch.manual_seed(0)
    GPT(base).save(folder / "dense")
    torch.manual_seed(0)
    moe = GPT(base.with_moe(num_experts=8, k=2))
    moe.save(folder / "moe")
    write_store(moe, folder / "moe_store")
    torch.manual_seed(0)
    mole = GPT(replace(base, ffn=[{"kind": "mole", "num_experts": 4, "d_ff": 512}] * base.n_layers)).eval()
    mole.save(folder / "mole")
    reparameterize(mole, folder / "mole_table", dtype=torch.float16, progress=False)
    # the unchecked configuration reads its own copy: a record just read by the other one may sit in a
    # cache below the OS page cache (the disk's, or a virtual machine host's) and would come back faster
    shutil.copytree(folder / "mole_table", folder / "mole_table_copy")


def _load_moe_on_disk(folder: Path) -> tuple[GPT, ExpertStore]:
    """The MoE with every expert left in its store (read unchecked, past the page cache, as the
    experts of (c) were always read): only the rest of the model is loaded."""
    store = ExpertStore(folder / "moe_store", verify=False, drop_page_cache=True)

    def swap(model: GPT, manifest: dict) -> None:
        for i, moe in enumerate(moe_layers(model)):
            moe.experts = StoreExperts(store, i)

    return load_without_experts(folder / "moe", swap), store


def _load(name: str, folder: Path) -> tuple[nn.Module, callable]:
    """The model of one configuration and a counter of the bytes it has read from disk."""
    if name in ("dense", "moe-ram"):
        return GPT.load(folder / ("dense" if name == "dense" else "moe")).eval(), (lambda: 0)
    if name == "moe-disk":
        model, store = _load_moe_on_disk(folder)
        return model, (lambda: store.bytes_read)
    model = load_served(folder / "mole", folder / ("mole_table_copy" if name == "mole-disk-unchecked" else "mole_table"))
    table = model.blocks[0].ffn.table
    table.drop_page_cache = True
    table.verify = name != "mole-disk-unchecked"
    return model, (lambda: table.bytes_read)


def _decoder(model: nn.Module, seq: Tensor, start: int = 16):
    """A step function that decodes ``seq`` one token at a time after a prefill of ``start`` tokens
    (random next tokens: random weights would make greedy decoding repeat itself, so every step
    brings a new token id and, for the MoE, a new routing)."""
    caches = [{} for _ in model.blocks]
    model(seq[:, :start], caches)
    pos = iter(range(start, seq.shape[1]))

    def step() -> None:
        t = next(pos)
        model(seq[:, t : t + 1], caches)

    return step


def _measure_memory(name: str, folder: str, vocab: int, new_tokens: int) -> dict:
    """Resident bytes, peak RSS and bytes read per new token of one configuration, alone in its process."""
    folder = Path(folder)
    rss_start = rss_mb()
    with torch.no_grad():
        model, read = _load(name, folder)
        g = torch.Generator().manual_seed(1)
        model(torch.randint(1, vocab, (8, 128), generator=g))
        step = _decoder(model, torch.randperm(vocab - 1, generator=g)[: 16 + new_tokens].view(1, -1) + 1)
        per_token = []
        for _ in range(new_tokens):
            before = read()
            step()
            per_token.append(read() - before)
        resident = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = peak_rss_mb()
    return {"config": name, "resident_param_bytes": resident, "bytes_read_per_token": statistics.mean(per_token),
            "peak_rss_mb": peak, "rss_at_start_mb": rss_start, "model_rss_mb": peak - rss_start}


def _measure_speed(folder: str, vocab: int, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Decode latency and prefill throughput of every configuration, timed round-robin in one
    process: each decode position and each prefill repeat runs every model once, in turn (in a
    shuffled order, new at every position), so slow phases of a shared machine hit all of them alike."""
    folder = Path(folder)
    with torch.no_grad():
        models = {name: _load(name, folder)[0] for name in CONFIGS}
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(1, vocab, (8, 128), generator=g)
        pre = interleaved_medians({n: (lambda m=m: m(prompt)) for n, m in models.items()}, repeats, warmup=1)
        lat: dict[str, list[float]] = {n: [] for n in models}
        for r in range(repeats + 1):
            seq = torch.randperm(vocab - 1, generator=g)[: 16 + new_tokens].view(1, -1) + 1
            steps = list({n: _decoder(m, seq) for n, m in models.items()}.items())
            for i in range(new_tokens):
                # a new order at every position (seeded): no model always follows the same one (the one after
                # the MoE on disk, which streams megabytes through the CPU caches, starts cold)
                random.Random(r * 1_000_003 + i).shuffle(steps)
                for n, step in steps:
                    t0 = time.perf_counter()
                    step()
                    if r:  # the first sequence warms up
                        lat[n].append(time.perf_counter() - t0)
    return {n: {"decode_ms": statistics.median(lat[n]) * 1e3, "prefill_tok_s": prompt.numel() / pre[n]}
            for n in models}


def _disk_read_mb_s(path: Path, block: int, reads: int = 64) -> float:
    """Median bandwidth of single ``pread`` calls of ``block`` bytes after dropping them from the page cache."""
    fd, size, times = os.open(path, os.O_RDONLY), os.path.getsize(path), []
    buf = bytearray(block)
    try:
        for i in range(reads):
            off = (i * block) % max(size - block, 1)
            drop_page_cache(fd, off, block)  # outside the timed read: only the device transfer is timed
            t0 = time.perf_counter()
            pread_exact(fd, buf, off)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return block / statistics.median(times) / 1e6


def run_mole_bench(out: str | os.PathLike | None = None, quick: bool = False, console=None) -> dict:
    console = console or Console()
    vocab, new_tokens, repeats = (1024, 16, 2) if quick else (4096, 64, 7)
    ctx = mp.get_context("spawn")
    memory = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("MOEKIT_BENCH_DIR")) as tmp:
        _prepare(Path(tmp), vocab)
        for name in CONFIGS:
            console.print(f"[dim]mole bench: memory of {name}...[/dim]")
            with ctx.Pool(1) as pool:  # a fresh process each: its peak RSS is this model's alone
                memory.append(pool.apply(_measure_memory, (name, tmp, vocab, new_tokens)))
        console.print("[dim]mole bench: speed, every model in turn...[/dim]")
        with ctx.Pool(1) as pool:
            speed = pool.apply(_measure_speed, (tmp, vocab, new_tokens, repeats))
        store = ExpertStore(Path(tmp) / "moe_store")
        expert_bytes = store.expert_bytes(0)
        disk_mb_s = _disk_read_mb_s(store.files[0], expert_bytes)
        store.close()
    results = [{**m, **speed[m["config"]]} for m in memory]
    by = {r["config"]: r for r in results}
    ms = {n: by[n]["decode_ms"] for n in by}
    ratios = {
        "mole_decode_vs_dense": ms["mole-disk"] / ms["dense"],
        "moe_disk_decode_vs_mole": ms["moe-disk"] / ms["mole-disk"],
        "mole_checked_vs_unchecked": ms["mole-disk"] / ms["mole-disk-unchecked"],
        # MoLE runs the dense model's computation plus its lookups, so no MoLE can beat the MoE on disk
        # by more than the MoE on disk is slower than dense: the ceiling of the ratio above
        "moe_disk_decode_vs_dense": ms["moe-disk"] / ms["dense"],
    }
    table = Table(title=f"moekit bench mole (fp32 compute, {torch.get_num_threads()} threads; disk reads bypass "
                        "the page cache; decode timed round-robin)")
    for col in ("model", "decode ms/token", "vs dense", "prefill tok/s", "resident params MB",
                "RSS MB (model)", "bytes read / token"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        table.add_row(r["config"], f"{r['decode_ms']:.2f}", f"{r['decode_ms'] / ms['dense']:.2f}x",
                      f"{r['prefill_tok_s']:,.0f}", f"{r['resident_param_bytes'] / 2**20:.1f}", f"{r['model_rss_mb']:.0f}",
                      f"{r['bytes_read_per_token']:,.0f}")
    console.print(table)
    console.print(", ".join(f"{k}={v:.2f}x" for k, v in ratios.items()))
    console.print(f"disk: {disk_mb_s:,.0f} MB/s for one uncached read of one expert ({expert_bytes:,} bytes)")
    report = {"benchmark": "mole", "torch": torch.__version__, "machine": platform.machine(), "vocab": vocab,
              "new_tokens": new_tokens, "repeats": repeats, "results": results, "ratios": ratios,
              "disk_read_mb_s": disk_mb_s, "expert_bytes": expert_bytes,
              "expected_mole_bytes_per_token": 4 * 4 * 128 * 2}
    if out is not None:
        atomic_write_text(Path(out), dumps(report, indent=2))
        console.print(f"wrote {out}")
    return report


__all__ = ["run_mole_bench", "StoreExperts", "CONFIGS"]
