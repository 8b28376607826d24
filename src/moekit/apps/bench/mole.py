"""`moekit bench mole`: MoLE's claim — decode at dense speed with experts on disk — measured.

Four demo-sized models of equal inference FLOPs (same attention, same dense/shared FFN width):
(a) dense; (b) top-2 MoE with every expert in RAM; (c) the same MoE with its experts on disk,
each expert a contiguous block read when a token needs it; (d) MoLE with its lookup table on
disk, each record checked against its CRC-32 as it is read (and (d'), the same with the check off, to
measure its cost). For (c) and (d) every read is a real read: before each ``pread`` the byte range is dropped
from the OS page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (clean pages are evicted, so
the read goes to the device). Each model runs in its own spawned process so that its peak RSS is
its own, and loads only what it keeps in memory: the MoE on disk and MoLE never materialise their
experts. "RSS (model)" is the peak RSS minus the RSS after importing torch. Weights are random:
only speed, memory and bytes moved are measured here.
"""

from __future__ import annotations

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
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.apps.bench.timing import interleaved_medians, peak_rss_mb, rss_mb
from moekit.dispatch import Segments
from moekit.experts import GroupedExperts, get_activation
from moekit.models import GPT, GPTConfig
from moekit.models.gpt import WEIGHTS_FILE, read_config
from moekit.ops.rotary import Rotary

#: ``mole-disk`` checks every record it reads against its CRC-32 (moekit's default);
#: ``mole-disk-unchecked`` is the same model with the check off, to measure what the check costs
CONFIGS = ("dense", "moe-ram", "moe-disk", "mole-disk", "mole-disk-unchecked")


def _drop_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class DiskExperts(nn.Module):
    """Experts kept on disk, one contiguous block each (``gate_up`` then ``down``), read on demand."""

    def __init__(self, path: Path, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.act, self.d_model, self.d_ff = get_activation(activation), d_model, d_ff
        first = 2 * d_ff if self.act.gated else d_ff
        self.first_shape, self.down_shape = (first, d_model), (d_model, d_ff)
        self.block_bytes = (first * d_model + d_model * d_ff) * 4
        if os.path.getsize(path) != num_experts * self.block_bytes:
            raise ValueError(f"{path}: expected {num_experts} experts of {self.block_bytes} bytes")
        self.fd = os.open(path, os.O_RDONLY)
        self.bytes_read = 0

    @staticmethod
    def write(experts: GroupedExperts, path: Path) -> None:
        with open(path, "wb") as f:
            for w1, w2 in zip(experts.first_proj, experts.down_proj):
                f.write(torch.cat([w1.reshape(-1), w2.reshape(-1)]).detach().float().numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())  # dirty pages cannot be dropped from the page cache: write them out first

    def load(self, e: int) -> tuple[Tensor, Tensor]:
        off = e * self.block_bytes
        _drop_cache(self.fd, off, self.block_bytes)
        buf = bytearray(os.pread(self.fd, self.block_bytes, off))
        self.bytes_read += len(buf)
        flat = torch.frombuffer(buf, dtype=torch.float32)
        n1 = self.first_shape[0] * self.first_shape[1]
        return flat[:n1].view(self.first_shape), flat[n1:].view(self.down_shape)

    def forward(self, x_ND: Tensor, seg: Segments) -> Tensor:
        out, start = x_ND.new_empty(x_ND.shape[0], self.d_model), 0
        for e, n in enumerate(seg.sizes):
            if n:
                w1, w2 = self.load(e)
                rows = slice(start, start + n)
                out[rows] = F.linear(self.act.apply(F.linear(x_ND[rows], w1)), w2)
                start += n
        return out


def _base(vocab: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, d_ff=512)


def _prepare(folder: Path, vocab: int) -> None:
    """Build every model once (same seed) and write what each configuration loads."""
    from moekit.models.mole import reparameterize

    base = _base(vocab)
    torch.manual_seed(0)
    GPT(base).save(folder / "dense")
    torch.manual_seed(0)
    moe = GPT(base.with_moe(num_experts=8, k=2))
    moe.save(folder / "moe")
    for i, block in enumerate(moe.blocks):
        DiskExperts.write(block.ffn.experts, folder / f"experts_{i}.bin")
    torch.manual_seed(0)
    mole = GPT(replace(base, ffn=[{"kind": "mole", "num_experts": 4, "d_ff": 512}] * base.n_layers)).eval()
    mole.save(folder / "mole")
    reparameterize(mole, folder / "mole_table", dtype=torch.float16, progress=False)
    # the unchecked configuration reads its own copy: a record just read by the other one may sit in a
    # cache below the OS page cache (the disk's, or a virtual machine host's) and would come back faster
    shutil.copytree(folder / "mole_table", folder / "mole_table_copy")


def _load_moe_on_disk(folder: Path) -> GPT:
    """The MoE with every expert left on disk: only the rest of the model is loaded."""
    from safetensors import safe_open

    cfg = read_config(folder / "moe")
    with torch.device("meta"):
        model = GPT(cfg)
    for i, block in enumerate(model.blocks):
        spec = cfg.layer_ffn(i)
        block.ffn.experts = DiskExperts(folder / f"experts_{i}.bin", spec["num_experts"], cfg.d_model, spec["d_ff"])
    model = model.to_empty(device="cpu")
    with safe_open(str(folder / "moe" / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        state = {n: f.get_tensor(n if n in keys else "head.weight" if n == "embed.weight" else "embed.weight")
                 for n in model.state_dict()}
    if cfg.tie_embeddings:  # to_empty gives every module its own tensor: tie them again
        model.head.weight = model.embed.weight
    model.load_state_dict(state, strict=True)
    model.rope = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    return model


def _load(name: str, folder: Path) -> tuple[nn.Module, callable]:
    """The model of one configuration and a counter of the bytes it has read from disk."""
    from moekit.models.mole import load_served

    if name in ("dense", "moe-ram"):
        return GPT.load(folder / ("dense" if name == "dense" else "moe")).eval(), (lambda: 0)
    if name == "moe-disk":
        model = _load_moe_on_disk(folder).eval()
        disks = [b.ffn.experts for b in model.blocks]
        return model, (lambda: sum(d.bytes_read for d in disks))
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
    try:
        for i in range(reads):
            off = (i * block) % max(size - block, 1)
            _drop_cache(fd, off, block)
            t0 = time.perf_counter()
            os.pread(fd, block, off)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return block / statistics.median(times) / 1e6


def run_mole_bench(out: str | os.PathLike | None = None, quick: bool = False, console=None) -> dict:
    import multiprocessing as mp

    from rich.console import Console
    from rich.table import Table

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
        expert_bytes = DiskExperts(Path(tmp) / "experts_0.bin", 8, 128, 256).block_bytes
        disk_mb_s = _disk_read_mb_s(Path(tmp) / "experts_0.bin", expert_bytes)
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
        from moekit.io import atomic_write_text, dumps

        atomic_write_text(Path(out), dumps(report, indent=2))
        console.print(f"wrote {out}")
    return report


__all__ = ["run_mole_bench", "DiskExperts", "CONFIGS"]
