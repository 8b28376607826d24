"""Re-parameterisation (MoLE, papers.md §3.3): a trained MoLE GPT's experts written out as a lookup table."""

from __future__ import annotations

import copy
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.io import dumps, write_folder
from moekit.models.mole.format import (
    DTYPES,
    MANIFEST,
    QUANTIZED,
    ROW_CRC,
    TABLE,
    TABLE_FORMAT,
    TABLE_KIND,
    quantize,
    record_bytes,
    source_hash,
)
from moekit.models.mole.inference import MoLELookup
from moekit.models.mole.lookup import LookupTable
from moekit.models.mole.train import MoLE, mole_layers

__all__ = ["reparameterize"]


def _sources(embedding: Tensor, layers: list[MoLE]) -> Iterator[Tensor]:
    """The tensors a table is computed from, in :func:`source_hash`'s order."""
    yield embedding
    for m in layers:
        yield from m.expert_norm.parameters()
        yield from m.experts.parameters()


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
    from rich.progress import Progress

    name = dtype if dtype in QUANTIZED else {v[0]: k for k, v in DTYPES.items()}.get(dtype)
    if name is None:
        valid = [str(v[0]) for v in DTYPES.values()] + [repr(q) for q in QUANTIZED]
        raise ValueError(f"reparameterize: dtype must be one of {valid}, got {dtype!r}")
    layers = mole_layers(model)
    emb = model.embed.weight
    V, D = emb.shape
    L, N = len(layers), layers[0].num_experts
    if name == "nf4" and D % block:
        raise ValueError(f"reparameterize: nf4 block={block} must divide d_model={D}")
    path = Path(path)
    per_token = (record_bytes(name, L, N, D, block) if name in QUANTIZED
                 else L * N * D * np.dtype(DTYPES[name][1]).itemsize)
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
                    raw = vals.to(DTYPES[name][0]).numpy().astype(np.dtype(DTYPES[name][1]).newbyteorder("<"))
                raw = np.ascontiguousarray(raw).view(np.uint8).reshape(rows.shape[0], per_token)
                crcs[start: start + rows.shape[0]] = [zlib.crc32(r) for r in raw]
                f.write(raw.tobytes())
                bar.advance(task, rows.shape[0])

    manifest = {"format": TABLE_FORMAT, "layout": "V,L,N,D", "vocab_size": V, "n_layers": L, "num_experts": N,
                "d_model": D, "dtype": name, "block": block if name == "nf4" else None,
                "bytes_per_token": per_token, "bytes": V * per_token, "source_sha256": source_hash(_sources(emb, layers))}
    with write_folder(path, TABLE_KIND, "MoLE table folder", whole=True) as w:
        w.write(TABLE, write, blocks=f"CRC-32 of each token's record in {ROW_CRC}")
        w.write_bytes(ROW_CRC, crcs.tobytes())
        w.write_text(MANIFEST, dumps(manifest, indent=2))
    inference = copy.deepcopy(model)
    table = LookupTable(path, expect_hash=manifest["source_sha256"], cache_bytes=cache_bytes)
    for i, b in enumerate(inference.blocks):
        b.ffn = MoLELookup(b.ffn, table, i)
    return inference
