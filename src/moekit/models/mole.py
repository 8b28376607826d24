"""MoLE — Mixture of Lookup Experts (Jie et al., ICML 2025).

Train form (papers.md §3.2, exactly as the official code): in layer ``l`` the routed experts read
the token's *raw embedding* through a per-layer RMSNorm, all ``N`` experts are active with a softmax
router (fp32) on the context hidden state, and a shared FFN runs on the hidden state:
``out = shared(u) + sum_j softmax(W_r u)_j * FFN_j(RMSNorm_l(E[id]))``; no auxiliary loss. Because an
expert's input depends only on the token id, each expert runs once per *unique* id in the batch and
the results are gathered (mathematically identical, much cheaper).

Re-parameterisation (§3.3): after training, ``FFN_j(RMSNorm_l(E[v]))`` is computed for every token
``v`` of the vocabulary and stored on disk as a table ``[V, L, N, D]`` (one token's rows for all
layers are contiguous, so a new token costs one read), with a manifest and a hash of the weights it
came from. The inference form computes no expert: it reads the rows of the batch's unique ids.

Quantized tables (the paper's post-training quantisation, §3.5; the implementation is ours): ``int8``
with an fp16 absmax scale per row (``code = round(x * 127 / absmax)``), and ``nf4`` with QLoRA's 16
NormalFloat levels, an fp16 absmax scale per ``block`` consecutive values of a row and two codes per
byte, the first in the high nibble (bitsandbytes' order). The paper quantizes MoLE-4E-160M to NF4 with
blocks of **768** (one scale per row at d=768; 25.3% of the fp16 size) and to NF3 with blocks of 128
(19.5%); our default block is **64** (QLoRA's default; 26.6% of fp16), so pass ``block=768`` (or
``block=d_model``) to :func:`reparameterize` for the paper's setting. NF3 is not implemented.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from moekit.dispatch import Segments
from moekit.experts import GroupedExperts
from moekit.io import IntegrityError, dumps, read_json, verify, write_folder
from moekit.layer import FFN
from moekit.models.ffn import register_ffn

MANIFEST = "manifest.json"
TABLE = "table.bin"
ROW_CRC = "table.crc32"
TABLE_KIND = "mole-table"
TABLE_FIX = "write the table again with moekit.models.mole.reparameterize (from the trained model)"
TABLE_FORMAT = 1
_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}
QUANTIZED = ("int8", "nf4")

# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def _record_bytes(kind: str, L: int, N: int, D: int, block: int) -> int:
    """Bytes of one token's rows (all layers and experts) in a quantized table."""
    if kind == "int8":
        return L * N * D + L * N * 2  # int8 values + one fp16 absmax scale per row
    return L * N * D // 2 + L * N * (D // block) * 2  # packed 4-bit codes + one fp16 scale per block


def quantize(x: Tensor, kind: str, block: int = 64) -> np.ndarray:
    """``x [b, L, N, D]`` fp32 -> ``[b, record_bytes]`` uint8 (values, then fp16 scales).

    ``int8``: one absmax per row of ``D``; ``nf4``: one absmax per ``block`` values (the paper: 768)."""
    b = x.shape[0]
    if kind == "int8":
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
        q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
        parts = [q.reshape(b, -1).numpy().view(np.uint8), scale.to(torch.float16).reshape(b, -1).numpy().view(np.uint8)]
    else:
        xb = x.reshape(*x.shape[:-1], -1, block)  # [b, L, N, D/block, block]
        scale = xb.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
        code = torch.bucketize((xb / scale).contiguous(), mids).to(torch.uint8).reshape(b, -1)
        packed = (code[:, 0::2] << 4) | code[:, 1::2]
        parts = [packed.numpy(), scale.to(torch.float16).reshape(b, -1).numpy().view(np.uint8)]
    return np.concatenate(parts, axis=1)


def dequantize(rec: np.ndarray, kind: str, shape: tuple[int, int, int], block: int = 64) -> Tensor:
    """Inverse of :func:`quantize`: ``[U, record_bytes]`` -> ``[U, L, N, D]`` fp32."""
    L, N, D = shape
    U = rec.shape[0]
    rec = torch.from_numpy(np.ascontiguousarray(rec))
    if kind == "int8":
        q = rec[:, : L * N * D].view(torch.int8).float().view(U, L, N, D)
        scale = rec[:, L * N * D :].contiguous().view(torch.float16).float().view(U, L, N, 1)
        return q * scale
    n = L * N * D // 2
    packed = rec[:, :n]
    code = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(U, L, N, D // block, block).long()
    scale = rec[:, n:].contiguous().view(torch.float16).float().view(U, L, N, D // block, 1)
    return (NF4_LEVELS[code] * scale).reshape(U, L, N, D)


class MoLE(nn.Module):
    """The MoLE FFN block, train form.

    Args:
        d_model: model width.
        d_ff: width of the shared FFN (the dense model's FFN).
        num_experts: routed experts ``N`` (all active).
        expert_d_ff: width of each routed expert.
        activation: the shared FFN's activation; ``expert_activation``: the experts' (the paper's
            Pythia-style models use a plain GELU FFN).
    """

    context_keys = ("token_ids", "embeddings")

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 4, expert_d_ff: int | None = None,
                 activation: str = "swiglu", expert_activation: str = "gelu", eps: float = 1e-5) -> None:
        super().__init__()
        self.d_model, self.num_experts = d_model, num_experts
        self.shared = FFN(d_model, d_ff, activation)
        self.router = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.expert_norm = nn.RMSNorm(d_model, eps=eps)
        self.experts = GroupedExperts(num_experts, d_model, expert_d_ff or d_ff, expert_activation)

    def gates(self, u_TD: Tensor) -> Tensor:
        return torch.softmax(nn.functional.linear(u_TD.float(), self.router.weight.float()), dim=-1)

    def expert_rows(self, emb_UD: Tensor) -> Tensor:
        """``FFN_j(RMSNorm(e))`` for every row ``e`` and expert ``j``: ``[U, N, D]``."""
        U, N = emb_UD.shape[0], self.num_experts
        x = self.expert_norm(emb_UD).repeat(N, 1)  # expert-major: N segments of U rows
        y = self.experts(x, Segments.from_counts(torch.full((N,), U, dtype=torch.long, device=x.device)))
        return y.view(N, U, -1).transpose(0, 1)

    def forward(self, u: Tensor, token_ids: Tensor | None = None, embeddings: Tensor | None = None) -> Tensor:
        if token_ids is None or embeddings is None:
            raise ValueError("MoLE needs token_ids and the raw token embeddings (moekit.models.GPT passes both)")
        shape = u.shape
        u_TD = u.reshape(-1, self.d_model)
        ids = token_ids.reshape(-1)
        uniq, inv = torch.unique(ids, return_inverse=True)
        # one position per unique id (any one will do: equal ids have equal embedding rows)
        where = torch.zeros_like(uniq).scatter_(0, inv, torch.arange(ids.numel(), device=ids.device))
        rows = self.expert_rows(embeddings.reshape(-1, self.d_model).index_select(0, where))  # [U, N, D]
        routed = torch.einsum("tn,tnd->td", self.gates(u_TD).to(rows.dtype), rows.index_select(0, inv))
        return (self.shared(u_TD) + routed).reshape(shape)


# ----------------------------------------------------------------------------------- the table on disk


@register_ffn("mole")
def mole_ffn(cfg, spec: dict) -> MoLE:
    """The ``mole`` FFN kind of the GPT: ``shared_d_ff`` (default the model's ``d_ff``) for the shared
    FFN, ``d_ff`` for each of the ``num_experts`` routed experts."""
    return MoLE(cfg.d_model, spec.get("shared_d_ff", cfg.d_ff), spec.get("num_experts", 4), spec.get("d_ff", cfg.d_ff),
                spec.get("activation", "swiglu"), spec.get("expert_activation", "gelu"), cfg.norm_eps)


def _hash_sources(embedding: Tensor, layers: list[MoLE]) -> str:
    h = hashlib.sha256()
    tensors = [embedding] + [t for m in layers for t in (*m.expert_norm.parameters(), *m.experts.parameters())]
    for t in tensors:
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _mole_layers(model) -> list[MoLE]:
    layers = [b.ffn for b in model.blocks if isinstance(b.ffn, MoLE)]
    if not layers:
        raise ValueError("reparameterize: the model has no MoLE layer (GPTConfig.ffn kind 'mole')")
    if len(layers) != len(model.blocks):
        raise ValueError("reparameterize: every layer must be MoLE (mixed models are not supported yet)")
    return layers


@torch.no_grad()
def reparameterize(model, path: str | os.PathLike, dtype: torch.dtype | str = torch.float16, batch: int = 512,
                   block: int = 64, cache_bytes: int = 0, progress: bool = True):
    """Write every layer's lookup table to ``path`` and return the inference-form model.

    The table is ``[V, L, N, D]``: ``torch.float16`` (the paper's default) or ``torch.float32``, or
    quantized after training: ``"int8"`` (absmax per row) or ``"nf4"`` (QLoRA's NormalFloat-4 with an
    absmax scale per ``block`` values; ``block`` must divide ``d_model``; the paper uses 768, our
    default 64 is QLoRA's). It is written atomically with a manifest (sizes, dtype,
    layout and a hash of the embedding, expert norms and expert weights it came from). The returned
    model is a copy whose MoLE blocks read rows from the table and compute no expert, keeping up to
    ``cache_bytes`` of recently used rows in RAM.
    """
    import copy

    from rich.progress import Progress

    name = dtype if dtype in QUANTIZED else {v[0]: k for k, v in _DTYPES.items()}.get(dtype)
    if name is None:
        valid = [str(v[0]) for v in _DTYPES.values()] + [repr(q) for q in QUANTIZED]
        raise ValueError(f"reparameterize: dtype must be one of {valid}, got {dtype!r}")
    layers = _mole_layers(model)
    emb = model.embed.weight
    V, D = emb.shape
    L, N = len(layers), layers[0].num_experts
    if name == "nf4" and D % block:
        raise ValueError(f"reparameterize: nf4 block={block} must divide d_model={D}")
    path = Path(path)
    per_token = (_record_bytes(name, L, N, D, block) if name in QUANTIZED
                 else L * N * D * np.dtype(_DTYPES[name][1]).itemsize)
    crcs = np.empty(V, dtype="<u4")  # one CRC-32 per token's record, checked whenever it is read from disk

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f, Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("re-parameterising MoLE experts", total=V)
            for start in range(0, V, batch):  # [V, L, N, D]: a block of tokens is contiguous for all layers
                rows = emb[start : start + batch]
                vals = torch.stack([m.expert_rows(rows) for m in layers], dim=1).float().cpu()  # [b, L, N, D]
                if name in QUANTIZED:
                    raw = quantize(vals, name, block)
                else:
                    raw = vals.to(_DTYPES[name][0]).numpy().astype(np.dtype(_DTYPES[name][1]).newbyteorder("<"))
                raw = np.ascontiguousarray(raw).view(np.uint8).reshape(rows.shape[0], per_token)
                crcs[start: start + rows.shape[0]] = [zlib.crc32(r) for r in raw]
                f.write(raw.tobytes())
                bar.advance(task, rows.shape[0])

    manifest = {"format": TABLE_FORMAT, "layout": "V,L,N,D", "vocab_size": V, "n_layers": L, "num_experts": N,
                "d_model": D, "dtype": name, "block": block if name == "nf4" else None,
                "bytes_per_token": per_token, "bytes": V * per_token, "source_sha256": _hash_sources(emb, layers)}
    with write_folder(path, TABLE_KIND, "MoLE table folder", whole=True) as w:
        w.write(TABLE, write, blocks=f"CRC-32 of each token's record in {ROW_CRC}")
        w.write_bytes(ROW_CRC, crcs.tobytes())
        w.write_text(MANIFEST, dumps(manifest, indent=2))
    inference = copy.deepcopy(model)
    table = LookupTable(path, expect_hash=manifest["source_sha256"], cache_bytes=cache_bytes)
    for i, block in enumerate(inference.blocks):
        block.ffn = MoLELookup(block.ffn, table, i)
    return inference


class LookupTable:
    """The on-disk table, memory-mapped; reads only the rows asked for, and counts the bytes read.

    ``cache_bytes > 0`` keeps recently used tokens' rows in RAM (least recently used evicted first;
    the budget is never exceeded); ``bytes_read`` then counts only what came from the table.
    """

    def __init__(self, path: str | os.PathLike, expect_hash: str | None = None, cache_bytes: int = 0) -> None:
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(f"{path / MANIFEST}: missing; was the table written by moekit.models.mole.reparameterize?")
        verify(path, TABLE_KIND, TABLE_FIX)
        m = read_json(path / MANIFEST, TABLE_FIX)
        if m.get("format") != TABLE_FORMAT or m.get("layout") != "V,L,N,D" or m.get("dtype") not in (*_DTYPES, *QUANTIZED):
            raise ValueError(f"{path}: unsupported table (format {m.get('format')}, dtype {m.get('dtype')})")
        if expect_hash is not None and m["source_sha256"] != expect_hash:
            raise ValueError(
                f"{path}: the table was built for other weights (hash {m['source_sha256'][:12]} != model "
                f"{expect_hash[:12]}); re-run moekit.models.mole.reparameterize on this model"
            )
        table = path / TABLE
        size = table.stat().st_size if table.exists() else None
        if size != m["bytes"]:
            raise ValueError(f"{table}: {'missing' if size is None else f'{size} bytes'}, expected {m['bytes']} "
                             "(truncated or incomplete); re-run moekit.models.mole.reparameterize")
        self.manifest, self.path = m, path
        self.shape = (m["vocab_size"], m["n_layers"], m["num_experts"], m["d_model"])
        self.kind = m["dtype"]
        if self.kind in QUANTIZED:
            self.rows = np.memmap(table, dtype=np.uint8, mode="r", shape=(self.shape[0], m["bytes_per_token"]))
        else:
            np_dtype = np.dtype(_DTYPES[self.kind][1]).newbyteorder("<")
            self.rows = np.memmap(table, dtype=np_dtype, mode="r", shape=self.shape)
        self.bytes_per_token = m["bytes_per_token"]
        self.crc32 = np.fromfile(path / ROW_CRC, dtype="<u4")
        if self.crc32.shape != (self.shape[0],):
            raise IntegrityError(f"{path / ROW_CRC}: {self.crc32.size} checksums for {self.shape[0]} tokens; {TABLE_FIX}")
        #: check each record read from disk against its CRC-32 (about a microsecond per 4 KiB record)
        self.verify = True
        self.bytes_read = 0
        #: read each row with pread after dropping it from the OS page cache (benchmarks of cold reads)
        self.drop_page_cache = False
        self._fd: int | None = None
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.cache_rows = cache_bytes // self.bytes_per_token  # whole rows only: never over budget
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_hits = 0
        self._last: tuple[list, Tensor] | None = None  # the last ids read and their rows [U, L, N, D]
        self._last_one: tuple[list, tuple[Tensor, ...]] | None = None  # one id's rows, per layer

    def read(self, ids: Tensor, layer: int) -> Tensor:
        """Layer ``layer``'s rows ``[U, N, D]`` (fp32) of the given sorted unique token ids. All layers'
        rows are read at once (one read per token) and kept for the layers that follow."""
        return self._rows(ids.tolist())[:, layer]

    def read_one(self, ids: Tensor, layer: int) -> Tensor:
        """Layer ``layer``'s rows ``[N, D]`` of one token id: :meth:`read` for the decode step."""
        key = ids.tolist()
        if self._last_one is None or self._last_one[0] != key:
            self._last_one = (key, self._rows(key)[0].unbind(0))
        return self._last_one[1][layer]

    def _rows(self, key: list[int]) -> Tensor:
        """All layers' rows ``[U, L, N, D]`` (fp32) of the ids in ``key``; the last call's are kept."""
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if key and (min(key) < 0 or max(key) >= self.shape[0]):
            raise ValueError(f"lookup table: token ids must lie in [0, {self.shape[0]}), got [{min(key)}, {max(key)}]")
        raw = self._fetch(key)
        if self.kind in QUANTIZED:
            rows = dequantize(raw, self.kind, self.shape[1:], self.manifest["block"] or 64)
        else:
            rows = torch.from_numpy(raw).float()
        self._last = (key, rows)
        return rows

    @property
    def cached_bytes(self) -> int:
        return len(self._cache) * self.bytes_per_token

    def _fetch(self, key: list[int]) -> np.ndarray:
        """Stored rows of the ids in ``key`` (storage dtype, a fresh array), from the RAM cache where possible."""
        out = np.empty((len(key), *self.rows.shape[1:]), dtype=self.rows.dtype)
        missing = list(range(len(key)))
        if self.cache_rows:
            missing = []
            for i, v in enumerate(key):
                row = self._cache.get(v)
                if row is None:
                    missing.append(i)
                else:
                    out[i] = row
                    self._cache.move_to_end(v)
            self.cache_hits += len(key) - len(missing)
        n = self.bytes_per_token
        if missing and self.drop_page_cache:  # a real read from the device: evict the range, then pread
            if self._fd is None:
                self._fd = os.open(self.path / TABLE, os.O_RDONLY)
            for i in missing:
                v = key[i]
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self._fd, v * n, n, os.POSIX_FADV_DONTNEED)
                if os.preadv(self._fd, [memoryview(out[i]).cast("B")], v * n) != n:
                    raise OSError(f"{self.path / TABLE}: short read of token {v}; the table file changed on disk")
        elif missing:
            out[missing] = self.rows[[key[i] for i in missing]]
        if self.verify:
            raw = out.reshape(len(key), -1).view(np.uint8)
            for i in missing:
                if zlib.crc32(raw[i]) != self.crc32[key[i]]:
                    raise IntegrityError(f"{self.path / TABLE}: the record of token {key[i]} does not match its "
                                         f"checksum (the table is corrupt); {TABLE_FIX}")
        self.bytes_read += len(missing) * n
        for i in missing if self.cache_rows else ():
            self._cache[key[i]] = out[i].copy()
            if len(self._cache) > self.cache_rows:
                self._cache.popitem(last=False)
        return out

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class MoLELookup(nn.Module):
    """MoLE block, inference form: shared FFN + router + rows read from the lookup table.

    In fp32 inference the router's ``N`` rows ride along in the shared FFN's up projection (one
    matmul of width ``d_ff + N`` instead of two; the fused weight is rebuilt whenever a source weight
    changes), so a decode step costs the dense FFN plus a softmax over ``N`` and one ``[1, N] x [N, D]``
    multiply-add.
    """

    context_keys = ("token_ids",)

    def __init__(self, trained: MoLE, table: LookupTable, layer: int) -> None:
        super().__init__()
        self.d_model, self.num_experts, self.layer = trained.d_model, trained.num_experts, layer
        self.shared, self.router = trained.shared, trained.router
        self.table = table
        self._fused: tuple[tuple, Tensor] | None = None

    def gates(self, u_TD: Tensor) -> Tensor:
        """Softmax router in fp32 (no casts when the model already is fp32)."""
        if u_TD.dtype == torch.float32 and self.router.weight.dtype == torch.float32:
            return torch.softmax(nn.functional.linear(u_TD, self.router.weight), dim=-1)
        return torch.softmax(nn.functional.linear(u_TD.float(), self.router.weight.float()), dim=-1)

    def _inference_weights(self) -> tuple | None:
        """``([up_proj; router], gate_proj, down_proj)`` weights for fp32 inference without autograd,
        rebuilt whenever a source weight is replaced or changed in place; ``None`` where the fused
        path does not apply (biases, another dtype)."""
        sh = self.shared
        srcs = (sh.up_proj.weight, self.router.weight, sh.gate_proj.weight if sh.act.gated else None,
                sh.down_proj.weight)
        key = tuple((t.data_ptr(), t._version) for t in srcs if t is not None)
        if self._fused is not None and self._fused[0] == key:
            return self._fused[1]
        if (sh.up_proj.bias is not None or sh.down_proj.bias is not None
                or any(t is not None and t.dtype != torch.float32 for t in srcs)):
            return None
        up, r, gate, down = srcs
        self._fused = (key, (torch.cat([up, r]).detach(), None if gate is None else gate.detach(), down.detach()))
        return self._fused[1]

    def forward(self, u: Tensor, token_ids: Tensor | None = None, **context) -> Tensor:
        if token_ids is None:
            raise ValueError("MoLELookup needs token_ids")
        shape = u.shape
        u_TD = u.reshape(-1, self.d_model)
        ids = token_ids.reshape(-1)
        w = None if torch.is_grad_enabled() or u.dtype != torch.float32 else self._inference_weights()
        if w is None:
            y_TD, g_TN = self.shared(u_TD), self.gates(u_TD).to(u.dtype)
        else:
            w_up_router, w_gate, w_down = w
            up, z = nn.functional.linear(u_TD, w_up_router).split([w_down.shape[1], self.num_experts], dim=-1)
            fn = self.shared.act.fn
            y_TD = nn.functional.linear(fn(nn.functional.linear(u_TD, w_gate)) * up if w_gate is not None else fn(up),
                                        w_down)
            g_TN = torch.softmax(z, dim=-1)
        if ids.numel() == 1:  # decoding one token: no unique, no gather, one fused multiply-add
            rows = self.table.read_one(ids, self.layer)  # [N, D]
            return torch.addmm(y_TD, g_TN, rows if rows.dtype == u.dtype else rows.to(u.dtype)).reshape(shape)
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = self.table.read(uniq, self.layer).to(u.dtype)  # [U, N, D]
        routed = torch.bmm(g_TN.unsqueeze(1), rows.index_select(0, inv)).squeeze(1)
        return (y_TD + routed).reshape(shape)


def load_served(checkpoint: str | os.PathLike, table: str | os.PathLike, cache_bytes: int = 0):
    """The inference-form model from a train-form checkpoint (``GPT.save``) and its table folder,
    without ever materialising the experts: only the dense part, routers and norms are loaded, the
    expert weights are streamed one tensor at a time to check the table's hash."""
    from safetensors import safe_open

    from moekit.models.gpt import CONFIG_FILE, GPT, WEIGHTS_FILE, read_config, verify_model
    from moekit.ops.rotary import Rotary

    verify_model(checkpoint)  # every tensor read below is the one saved
    cfg = read_config(checkpoint)
    with torch.device("meta"):
        model = GPT(cfg)
    layers = _mole_layers(model)
    weights = Path(checkpoint) / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: missing; save the trained model with GPT.save ({CONFIG_FILE} + weights)")
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        emb_key = "embed.weight" if "embed.weight" in keys else "head.weight"
        names = [emb_key] + [f"blocks.{i}.ffn.{sub}.{n}" for i, m in enumerate(layers)
                             for sub, mod in (("expert_norm", m.expert_norm), ("experts", m.experts))
                             for n, _ in mod.named_parameters()]
        h = hashlib.sha256()
        for n in names:
            h.update(f.get_tensor(n).to(torch.float32).contiguous().numpy().tobytes())
        lookup = LookupTable(table, expect_hash=h.hexdigest(), cache_bytes=cache_bytes)
        for i, block in enumerate(model.blocks):
            block.ffn = MoLELookup(block.ffn, lookup, i)
        model = model.to_empty(device="cpu")
        state = {}
        for name in model.state_dict():
            src = name if name in keys else (emb_key if name in ("embed.weight", "head.weight") else None)
            if src is None:
                raise ValueError(f"{weights}: no tensor for {name}")
            state[name] = f.get_tensor(src)
    if cfg.tie_embeddings:  # to_empty gives every module its own tensor: tie them again
        model.head.weight = model.embed.weight
    model.load_state_dict(state, strict=True)
    model.rope = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)  # non-persistent buffers
    return model.eval()
