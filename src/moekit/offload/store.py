"""The expert store: every MoE layer's experts on disk, one contiguous block per expert.

A store is a folder: ``manifest.json`` and one safetensors file per layer (``layer_000.safetensors``...)
holding a 1-D tensor ``expert.{e}`` per expert: its first projection (``gate_up_proj`` or
``up_proj``), then ``down_proj``, then the biases if any, flattened, so one load is one ``pread``.
A layer of :class:`~moekit.compress.quantized.QuantizedExperts` (MC-MoE: each expert at a width of its
own) stores each expert exactly as quantized: its biases (fp32), then each matrix's fp16 scales and
zeros, then the packed codes (:meth:`LayerSpec.quant_parts`), one ``uint8`` block per expert, so its
experts' blocks differ in size. The manifest records each layer's shapes (and each expert's width and
the group of a quantized layer), the storage dtype, each block's byte offset and CRC-32,
and a fingerprint of the model it was written from (its routers and shapes), so a store written
for another model, a truncated or corrupt file, or a missing layer is an error, never stale weights.
The folder is written to a temporary name and renamed into place.

Reads go through ``os.preadv`` straight into the caller's buffer (:mod:`moekit.ops.uncached`). With
``drop_page_cache=True`` each block is evicted from the OS page cache first (``posix_fadvise(DONTNEED)``),
so every load is a real read from the device rather than a copy from RAM (what a benchmark needs; a
user serving a model gains from the page cache and leaves it off).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.compress.quant import QuantizedTensor
from moekit.compress.quantized import QuantizedExperts
from moekit.io import dumps, inside, read_json, write_folder
from moekit.io import verify as verify_folder
from moekit.layer import MoE
from moekit.ops.quant import quantize_int8
from moekit.ops.uncached import ShortRead, drop_page_cache, pread_exact

__all__ = ["ExpertStore", "LayerSpec", "fingerprint", "moe_layers", "write_store"]

FORMAT = "moekit-expert-store"
VERSION = 2  # 2: quantized layers (``bits``, ``group``, ``block_bytes``); version 1 stores are read as they are
READABLE = (1, 2)
MANIFEST = "manifest.json"
STORE_KIND = "expert-store"
FIX = "the store is damaged: write it again with moekit.offload.write_store (a store beside a model is rebuilt by itself)"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The model's MoE layers in forward order (module order)."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no moekit MoE layer to offload; convert it first "
                         "(moekit.convert, or moekit.convert.patch_hf_model for Hugging Face MoE models)")
    return layers


@dataclass(frozen=True)
class LayerSpec:
    """Shapes of one layer's experts and where their parts sit in a block."""

    num_experts: int
    d_model: int
    d_ff: int
    activation: str
    bias: bool
    first_out: int  # 2 * d_ff for gated activations
    bits: tuple[int, ...] | None = None  # each expert's code width, for a quantized layer
    group: int = 0  # input columns per scale of a quantized layer

    @classmethod
    def of(cls, moe: nn.Module) -> LayerSpec:
        ex = moe.experts
        if isinstance(getattr(ex, "spec", None), LayerSpec):  # already served from a store
            return ex.spec
        if isinstance(ex, QuantizedExperts):
            first = ex.experts[0]
            return cls(ex.num_experts, ex.d_model, ex.d_ff, ex.activation, first.down_bias is not None,
                       first.shapes["first"][0], tuple(ex.bits), ex.group)
        return cls(ex.num_experts, ex.d_model, ex.d_ff, ex.activation, ex.down_proj_bias is not None,
                   ex.first_proj.shape[1])

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def quant_parts(self, expert: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """A quantized expert's block: fp32 biases first (so every part is aligned), then each matrix's
        fp16 scales and zeros (no zeros at 1 bit), then the packed codes of ``first``, then ``down``."""
        b = self.bits[expert]
        mats = [("first", (self.first_out, self.d_model)), ("down", (self.d_model, self.d_ff))]
        out = [("first_bias", (self.first_out,), torch.float32), ("down_bias", (self.d_model,), torch.float32)]
        out = out if self.bias else []
        for name, (o, i) in mats:
            out += [(f"{name}_{k}", (o, i // self.group), torch.float16) for k in ("scale", "zero")[: 1 + (b > 1)]]
        return out + [(f"{name}_codes", (math.ceil(o * i * b / 8),), torch.uint8) for name, (o, i) in mats]

    def block_bytes(self, expert: int, dtype: torch.dtype) -> int:
        """Bytes of one expert's block (``dtype``: the store's, for a float layer)."""
        if not self.quantized:
            return self.numel * dtype.itemsize
        return sum(math.prod(s) * d.itemsize for _, s, d in self.quant_parts(expert))

    def split_quant(self, expert: int, buf: Tensor) -> dict[str, Tensor | QuantizedTensor]:
        """A quantized expert's block (``uint8``) as ``first`` / ``down`` :class:`QuantizedTensor` views
        (and ``first_bias`` / ``down_bias``)."""
        raw, i = {}, 0
        for name, shape, dtype in self.quant_parts(expert):
            n = math.prod(shape) * dtype.itemsize
            raw[name] = buf[i: i + n].view(dtype).view(shape)
            i += n
        out = {k: v for k, v in raw.items() if k.endswith("_bias")}
        for name, shape in (("first", (self.first_out, self.d_model)), ("down", (self.d_model, self.d_ff))):
            out[name] = QuantizedTensor(raw[f"{name}_codes"], raw[f"{name}_scale"], raw.get(f"{name}_zero"),
                                        self.bits[expert], self.group, shape)
        return out

    @property
    def parts(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of each part of a block, in order."""
        out = [("first", (self.first_out, self.d_model)), ("down", (self.d_model, self.d_ff))]
        if self.bias:
            out += [("first_bias", (self.first_out,)), ("down_bias", (self.d_model,))]
        return out

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for _, s in self.parts)

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of a flat block as its named parts."""
        out, i = {}, 0
        for name, shape in self.parts:
            n = int(torch.Size(shape).numel())
            out[name] = flat[i: i + n].view(shape)
            i += n
        return out

    @property
    def low_parts(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The int8 copy's block: fp32 row scales (and biases) first, so every fp32 part is aligned,
        then the int8 matrices."""
        out = [("first_scale", (self.first_out,), torch.float32), ("down_scale", (self.d_model,), torch.float32)]
        if self.bias:
            out += [("first_bias", (self.first_out,), torch.float32), ("down_bias", (self.d_model,), torch.float32)]
        return out + [("first", (self.first_out, self.d_model), torch.int8), ("down", (self.d_model, self.d_ff), torch.int8)]

    @property
    def low_bytes(self) -> int:
        return sum(int(torch.Size(s).numel()) * d.itemsize for _, s, d in self.low_parts)

    def split_low(self, buf: Tensor) -> dict[str, Tensor]:
        """Views of an int8-copy block (``uint8`` bytes) as its named parts."""
        out, i = {}, 0
        for name, shape, dtype in self.low_parts:
            n = int(torch.Size(shape).numel()) * dtype.itemsize
            out[name] = buf[i: i + n].view(dtype).view(shape)
            i += n
        return out


def _low_block(moe: nn.Module, e: int) -> Tensor:
    """The int8 copy of one expert (:attr:`LayerSpec.low_parts`): int8 per output row."""
    ex = moe.experts
    q1, s1 = quantize_int8(ex.first_proj[e])
    q2, s2 = quantize_int8(ex.down_proj[e])
    parts = [s1.squeeze(1), s2.squeeze(1)]
    if ex.down_proj_bias is not None:
        parts += [ex.first_bias[e].detach().float(), ex.down_proj_bias[e].detach().float()]
    raw = [p.contiguous().view(torch.uint8).reshape(-1) for p in parts]
    raw += [q1.view(torch.uint8).reshape(-1), q2.view(torch.uint8).reshape(-1)]
    return torch.cat(raw).cpu()


def _quant_block(moe: nn.Module, e: int) -> Tensor:
    """One quantized expert's block (:meth:`LayerSpec.quant_parts`): its stored bytes as they are."""
    ex, spec = moe.experts.experts[e], LayerSpec.of(moe)
    parts = [getattr(ex, name) for name, _, _ in spec.quant_parts(e)]
    return torch.cat([p.detach().contiguous().view(torch.uint8).reshape(-1) for p in parts]).cpu()


def _layer_blocks(moe: nn.Module, spec: LayerSpec, dtype: torch.dtype, low_bit: bool) -> dict[str, Tensor]:
    """The named blocks of one layer's file: each expert's (and its int8 copy, if asked)."""
    if spec.quantized:
        return {f"expert.{e}": _quant_block(moe, e) for e in range(spec.num_experts)}
    blocks = {f"expert.{e}": _block(moe, e, dtype) for e in range(spec.num_experts)}
    if low_bit:
        blocks.update({f"expert.{e}.int8": _low_block(moe, e) for e in range(spec.num_experts)})
    return blocks


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of every MoE layer's expert shapes and router parameters, and of a model-level
    PreGate (Read-ME) if there is one: what a store must match. The expert weights themselves are
    checked block by block (:meth:`ExpertStore.check_model`)."""
    h = hashlib.sha256()
    layers = moe_layers(model)
    routers = [(f"layer{i}.", moe.gate) for i, moe in enumerate(layers)]
    for i, moe in enumerate(layers):
        spec = LayerSpec.of(moe)
        h.update(json.dumps([i, spec.num_experts, spec.d_model, spec.d_ff, spec.activation, spec.bias]).encode())
        if spec.quantized:  # another allocation of widths is another model
            h.update(json.dumps({"bits": list(spec.bits), "group": spec.group}).encode())
    if isinstance(getattr(model, "pregate", None), nn.Module):
        routers.append(("pregate.", model.pregate))
    for prefix, module in routers:
        for name, p in sorted(module.state_dict().items()):
            h.update((prefix + name).encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _block(moe: nn.Module, e: int, dtype: torch.dtype) -> Tensor:
    ex = moe.experts
    parts = [ex.first_proj[e], ex.down_proj[e]]
    if ex.down_proj_bias is not None:
        parts += [ex.first_bias[e], ex.down_proj_bias[e]]
    return torch.cat([p.detach().reshape(-1) for p in parts]).to(dtype).contiguous().cpu()  # from any device


def _header(path: Path) -> tuple[int, dict]:
    """``(data start, header)`` of a safetensors file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated (no safetensors header); rewrite the store with moekit.offload.write_store")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: truncated header ({size} bytes); rewrite the store with moekit.offload.write_store")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: {size:,} bytes, its header describes {8 + n + end:,}; "
                         "rewrite the store with moekit.offload.write_store")
    return 8 + n, header


def write_store(model: nn.Module, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                low_bit: bool = False, source: dict | None = None) -> ExpertStore:
    """Write every MoE layer's experts of ``model`` to ``folder`` and open it. The store is written
    aside and swapped in whole; an existing ``folder`` must be an expert store (anything else is
    refused, never replaced). ``dtype`` is the storage dtype of float experts (default: the experts'
    own); quantized experts (:class:`~moekit.compress.quantized.QuantizedExperts`) are stored as
    they are. ``low_bit`` also writes an int8 copy of every float expert (per-row scales; about a
    quarter of the fp32 bytes) for mixed-precision serving. ``source`` (JSON) records what the store
    was derived from."""
    from safetensors.torch import save_file

    folder = Path(folder)
    layers = moe_layers(model)
    specs = [LayerSpec.of(moe) for moe in layers]
    if low_bit and any(s.quantized for s in specs):
        raise ValueError("write_store: low_bit writes int8 copies of float experts, but this model's experts are "
                         "quantized already (QuantizedExperts); write the store without low_bit")
    floats = [moe.experts.down_proj.dtype for moe, s in zip(layers, specs) if not s.quantized]
    dtype = dtype or (floats[0] if floats else torch.float32)
    name = next((k for k, v in DTYPES.items() if v == dtype), None)
    if name is None:
        raise ValueError(f"write_store: unsupported dtype {dtype}; valid dtypes are {list(DTYPES)}")
    manifest = {"format": FORMAT, "version": VERSION, "dtype": name, "fingerprint": fingerprint(model),
                "low_bit": bool(low_bit), "source": source, "layers": []}
    with write_folder(folder, STORE_KIND, "expert store", whole=True) as w:
        for i, (moe, spec) in enumerate(zip(layers, specs)):
            blocks = _layer_blocks(moe, spec, dtype, low_bit)
            file = f"layer_{i:03d}.safetensors"
            path = w.write(file, lambda tmp, b=blocks, i=i: save_file(b, tmp, metadata={"format": FORMAT, "layer": str(i)}),
                           blocks=f"CRC-32 of each expert's block in {MANIFEST}")
            start, header = _header(path)
            offsets, crcs = [], []
            for e in range(spec.num_experts):
                b0, b1 = header[f"expert.{e}"]["data_offsets"]
                offsets.append(start + b0)
                crcs.append(zlib.crc32(blocks[f"expert.{e}"].view(torch.uint8).numpy().tobytes()))
                if b1 - b0 != spec.block_bytes(e, dtype):
                    raise RuntimeError(f"write_store: layer {i} expert {e}: {b1 - b0} bytes written, "
                                       f"expected {spec.block_bytes(e, dtype)}")
            entry = {"file": file, "num_experts": spec.num_experts, "d_model": spec.d_model, "d_ff": spec.d_ff,
                     "activation": spec.activation, "bias": spec.bias, "first_out": spec.first_out, "offsets": offsets,
                     "crc32": crcs}
            if spec.quantized:
                entry.update(bits=list(spec.bits), group=spec.group,
                             block_bytes=[spec.block_bytes(e, dtype) for e in range(spec.num_experts)])
            if low_bit:
                entry["low_offsets"] = [start + header[f"expert.{e}.int8"]["data_offsets"][0]
                                        for e in range(spec.num_experts)]
                entry["low_crc32"] = [zlib.crc32(blocks[f"expert.{e}.int8"].numpy().tobytes())
                                      for e in range(spec.num_experts)]
            manifest["layers"].append(entry)
        w.write_text(MANIFEST, dumps(manifest))
    return ExpertStore(folder)


class ExpertStore:
    """An opened store: ``read(layer, expert, out)`` fills ``out`` (a flat tensor of the storage dtype).

    Args:
        folder: written by :func:`write_store`.
        verify: check each block's CRC-32 on every read (cheap next to the read itself).
        drop_page_cache: evict each block from the OS page cache before reading it.
    """

    def __init__(self, folder: str | os.PathLike, verify: bool = True, drop_page_cache: bool = False) -> None:
        self.folder = Path(folder)
        self.fds = []
        man = self.folder / MANIFEST
        if not man.exists():
            raise FileNotFoundError(f"{man}: missing; {self.folder} is not an expert store (write one with "
                                    "moekit.offload.write_store(model, folder))")
        verify_folder(self.folder, STORE_KIND, FIX)
        m = read_json(man, FIX)
        if m.get("format") != FORMAT or m.get("version") not in READABLE:
            raise ValueError(f"{man}: not a {FORMAT} manifest of a version this moekit reads {READABLE}")
        if m["dtype"] not in DTYPES:
            raise ValueError(f"{man}: unsupported dtype {m['dtype']!r}; valid dtypes are {list(DTYPES)}")
        self.dtype = DTYPES[m["dtype"]]
        self.fingerprint = m["fingerprint"]
        self.source = m.get("source")
        self.layers = [LayerSpec(d["num_experts"], d["d_model"], d["d_ff"], d["activation"], d["bias"],
                                 d["first_out"], tuple(d["bits"]) if "bits" in d else None, d.get("group", 0))
                       for d in m["layers"]]
        #: bytes of each expert's block, per layer
        self.sizes = [[s.block_bytes(e, self.dtype) for e in range(s.num_experts)] for s in self.layers]
        self.offsets = [d["offsets"] for d in m["layers"]]
        self.crc32 = [d["crc32"] for d in m["layers"]]
        self.low_bit = bool(m.get("low_bit"))
        self.low_offsets = [d.get("low_offsets") for d in m["layers"]]
        self.low_crc32 = [d.get("low_crc32") for d in m["layers"]]
        self.verify, self.drop_page_cache = verify, drop_page_cache
        self.files = [inside(self.folder, d["file"], str(man)) for d in m["layers"]]
        for d, spec, path, sizes in zip(m["layers"], self.layers, self.files, self.sizes):
            if not path.exists():
                self.close()
                raise FileNotFoundError(f"{path}: missing from the expert store; rewrite it with moekit.offload.write_store")
            _header(path)
            if d.get("block_bytes", sizes) != sizes:
                self.close()
                raise ValueError(f"{man}: {path.name}'s block sizes {d['block_bytes']} do not match its experts' widths "
                                 f"{d.get('bits')}; {FIX}")
            end = max(o + n for o, n in zip(d["offsets"], sizes))
            if self.low_bit:
                end = max(end, max(d["low_offsets"]) + spec.low_bytes)
            if path.stat().st_size < end:
                self.close()
                raise ValueError(f"{path}: truncated ({path.stat().st_size:,} bytes, need {end:,}); "
                                 "rewrite the store with moekit.offload.write_store")
            self.fds.append(os.open(path, os.O_RDONLY))
        self.bytes_read = 0
        self._lock = threading.Lock()

    @property
    def quantized(self) -> bool:
        """Whether any layer's experts are quantized (blocks of different sizes)."""
        return any(s.quantized for s in self.layers)

    def expert_bytes(self, layer: int) -> int:
        """Bytes of the largest block of ``layer`` (every block of a float layer)."""
        return max(self.sizes[layer])

    def total_bytes(self) -> int:
        return sum(sum(s) for s in self.sizes)

    def check_model(self, model: nn.Module) -> None:
        """Raise unless the store was written from ``model`` (same routers and expert shapes)."""
        layers = moe_layers(model)
        if len(layers) != len(self.layers):
            raise ValueError(f"{self.folder}: written for a model with {len(self.layers)} MoE layers, this one has "
                             f"{len(layers)}; write a store from this model with moekit.offload.write_store")
        if fingerprint(model) != self.fingerprint:
            raise ValueError(f"{self.folder}: written for another model (router / shape fingerprint differs); "
                             "write a store from this model with moekit.offload.write_store")
        for i, moe in enumerate(layers):  # experts still in memory: every block must be the stored one
            ex = moe.experts
            quantized = isinstance(ex, QuantizedExperts)
            if not quantized and (not hasattr(ex, "first_proj") or ex.down_proj.is_meta):
                continue
            for e in range(self.layers[i].num_experts):
                block = _quant_block(moe, e) if quantized else _block(moe, e, self.dtype)
                if zlib.crc32(block.view(torch.uint8).numpy().tobytes()) != self.crc32[i][e]:
                    raise ValueError(f"{self.folder}: layer {i} expert {e} differs from the model's (the experts were "
                                     "trained on since the store was written); write the store again with "
                                     "moekit.offload.write_store")

    def block_dtype(self, layer: int) -> torch.dtype:
        """The dtype :meth:`read` fills: ``uint8`` for a quantized layer, else ``store.dtype``."""
        return torch.uint8 if self.layers[layer].quantized else self.dtype

    def read(self, layer: int, expert: int, out: Tensor) -> Tensor:
        """Read one expert's block into ``out`` (flat, contiguous, :meth:`block_dtype`); returns ``out``."""
        dtype = self.block_dtype(layer)
        size = self.sizes[layer][expert] if 0 <= expert < len(self.sizes[layer]) else 0
        n = size // dtype.itemsize
        if out.dtype != dtype or out.numel() < n or not out.is_contiguous():
            raise ValueError(f"ExpertStore.read: out must be a contiguous {dtype} tensor of at least {n} elements, "
                             f"got {out.dtype} {tuple(out.shape)}")
        self._read(layer, expert, self.offsets, self.crc32, size, out[:n].view(torch.uint8))
        return out

    def read_low(self, layer: int, expert: int, out: Tensor) -> dict[str, Tensor]:
        """Read one expert's int8 copy into ``out`` (``uint8``, at least ``layers[layer].low_bytes``);
        returns its parts (views)."""
        if not self.low_bit:
            raise ValueError(f"{self.folder}: written without int8 copies; rewrite it with write_store(..., low_bit=True)")
        n = self.layers[layer].low_bytes
        if out.dtype != torch.uint8 or out.numel() < n:
            raise ValueError(f"ExpertStore.read_low: out must be a uint8 tensor of at least {n} bytes, got "
                             f"{out.dtype} {tuple(out.shape)}")
        self._read(layer, expert, self.low_offsets, self.low_crc32, n, out[:n])
        return self.layers[layer].split_low(out[:n])

    def stream(self, layer: int, expert: int, buf: Tensor) -> Iterator[tuple[str, int, Tensor]]:
        """One expert's parts read through ``buf`` (a small flat scratch of ``store.dtype``), in the
        order an expert is computed: ``("first", row, rows)`` chunks, then ``("bias", 0, biases)``
        (the first projection's bias, then the down projection's; only if the layer has them), then
        ``("down", row, rows)`` chunks. Each chunk is a view of ``buf``, valid until the next one.
        The block's CRC-32 is checked once the last chunk has been consumed: a corrupt block raises
        before the loop over the chunks ends, so what was computed from it is never returned."""
        spec, size = self.layers[layer], self.dtype.itemsize
        if spec.quantized:
            raise ValueError(f"ExpertStore.stream: layer {layer} is quantized; read its block whole (ExpertStore.read)")
        widest = max(spec.d_model, spec.d_ff)
        if buf.dtype != self.dtype or buf.numel() < widest or not buf.is_contiguous() or buf.device.type != "cpu":
            raise ValueError(f"ExpertStore.stream: buf must be a contiguous CPU {self.dtype} tensor of at least {widest} "
                             f"elements (one row), got {buf.dtype} {tuple(buf.shape)} on {buf.device}")
        buf = buf.reshape(-1)
        n = spec.numel * size
        fd, off = self._locate(layer, expert, self.offsets, n)
        crc = 0
        raw = buf.view(torch.uint8).numpy()  # views made once: a chunk costs a read and a checksum

        def rows(name: str, start: int, count: int, width: int) -> Iterator[tuple[str, int, Tensor]]:
            nonlocal crc
            step = max(1, buf.numel() // width)
            views = {}
            for r in range(0, count, step):
                k = min(step, count - r)
                if k not in views:
                    views[k] = (raw[: k * width * size], buf[: k * width].view(k, width))
                mem, chunk = views[k]
                self._pread(fd, mem, off + (start + r * width) * size, layer, expert)
                crc = zlib.crc32(mem, crc)
                yield name, r, chunk

        first = spec.first_out * spec.d_model
        yield from rows("first", 0, spec.first_out, spec.d_model)
        tail = None
        if spec.bias:  # after both matrices in the block; read out of order, checksummed in order
            tail = torch.empty(spec.first_out + spec.d_model, dtype=self.dtype)
            self._pread(fd, tail.view(torch.uint8).numpy(), off + (first + spec.d_model * spec.d_ff) * size, layer,
                        expert)
            yield "bias", 0, tail
        yield from rows("down", first, spec.d_model, spec.d_ff)
        if tail is not None:
            crc = zlib.crc32(tail.view(torch.uint8).numpy(), crc)
        self._done(layer, expert, n, crc, self.crc32)

    def _pread(self, fd: int, buf, off: int, layer: int, expert: int) -> None:
        try:
            pread_exact(fd, buf, off)
        except ShortRead as e:
            raise ValueError(f"{self.files[layer]}: layer {layer} expert {expert}: short read ({e.got} of {e.want} "
                             "bytes); the store is truncated, rewrite it with moekit.offload.write_store") from None

    def _locate(self, layer: int, expert: int, offsets, n: int) -> tuple[int, int]:
        """``(fd, offset)`` of a block of ``n`` bytes (dropped from the page cache first if asked)."""
        spec = self.layers[layer]
        if not 0 <= expert < spec.num_experts:
            raise IndexError(f"expert store: expert {expert} out of range for layer {layer} ({spec.num_experts} experts)")
        off, fd = offsets[layer][expert], self.fds[layer]
        if self.drop_page_cache:
            drop_page_cache(fd, off, n)
        return fd, off

    def _done(self, layer: int, expert: int, n: int, crc: int, crcs) -> None:
        """Count a block's ``n`` bytes as read, then check its checksum."""
        with self._lock:  # prefetch threads read too
            self.bytes_read += n
        if self.verify and crc != crcs[layer][expert]:
            raise ValueError(f"{self.files[layer]}: layer {layer} expert {expert}: checksum mismatch, the store is "
                             "corrupt; rewrite it with moekit.offload.write_store")

    def _read(self, layer: int, expert: int, offsets, crcs, n: int, out_u8: Tensor) -> None:
        fd, off = self._locate(layer, expert, offsets, n)
        buf = out_u8.numpy()
        self._pread(fd, buf, off, layer, expert)
        self._done(layer, expert, n, zlib.crc32(buf) if self.verify else 0, crcs)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"ExpertStore({str(self.folder)!r}, layers={len(self.layers)}, dtype={self.dtype}, "
                f"total={self.total_bytes() / 2**20:.1f} MiB)")
