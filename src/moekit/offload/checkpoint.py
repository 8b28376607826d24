"""Serving a saved moekit GPT with its experts on disk: :func:`load_offloaded`.

The checkpoint's experts are never loaded into RAM: the model is built with them on the meta device
and the server's offloaded experts take their place (:mod:`moekit.models.loading`). The store beside
the checkpoint is derived from it and written again whenever the checkpoint changes. A model saved
by :func:`moekit.compress.mcmoe.save_compressed` (MC-MoE: experts quantized at widths of their own,
ODP routers) is served the same way: its store holds each expert as quantized.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from torch import nn

from moekit.compress.mcmoe import LAYOUT_FILE, load_compressed, restore_attention
from moekit.io import check_target, kind_of, read_json, verify
from moekit.layer import MoE
from moekit.models.gpt import GPT, WEIGHTS_FILE
from moekit.models.loading import load_without_experts
from moekit.offload.runtime import ExpertServer, attach, budget_bytes, open_store, pregate_future
from moekit.offload.store import MANIFEST, STORE_KIND, ExpertStore, LayerSpec, moe_layers, write_store
from moekit.routers.odp import ODP

__all__ = ["load_offloaded"]


def _stale(folder: Path, stamp: dict, low_bit: bool) -> bool:
    """Whether the store in ``folder`` must be written again: missing, damaged, written from another
    version of the checkpoint, or without the int8 copies asked for."""
    if kind_of(folder) != STORE_KIND:
        return True
    try:
        verify(folder, STORE_KIND, "")
        m = read_json(folder / MANIFEST)
    except (OSError, ValueError):
        return True
    return m.get("source") != stamp or (low_bit and not m.get("low_bit"))


def _store_for(path: Path, stamp: dict, store: ExpertStore | str | os.PathLike | None, low_bit: bool) -> ExpertStore:
    """The opened store of the checkpoint at ``path``: ``store``, or ``path/experts`` written from the
    checkpoint when missing, damaged or older than the checkpoint. A ``store`` folder given explicitly
    is written only if it does not exist (or is empty); anything else there is refused, untouched."""
    own = store is None  # path/experts is derived from the checkpoint: rebuilt whenever the checkpoint changes
    folder = Path(store.folder if isinstance(store, ExpertStore) else store or path / "experts")
    if not isinstance(store, ExpertStore):
        exists = check_target(folder, STORE_KIND, "expert store")
        if not exists or (own and _stale(folder, stamp, low_bit)):
            compressed = (path / LAYOUT_FILE).exists()
            write_store(load_compressed(path) if compressed else GPT.load(path), folder, low_bit=low_bit, source=stamp)
    store = open_store(store if isinstance(store, ExpertStore) else folder)
    if store.source and store.source.get("checkpoint") == stamp["checkpoint"] and store.source != stamp:
        raise ValueError(f"{store.folder}: written from an older version of {path / WEIGHTS_FILE}; write it again "
                         "(moekit.offload.write_store) or leave store=None to have it rebuilt")
    return store


def _layer_specs(model: GPT, path: Path) -> list[LayerSpec]:
    """The shapes of ``model``'s experts (still on the meta device), with each expert's width where
    the checkpoint is MC-MoE's (``mcmoe.json``), whose ODP routers are put in place here."""
    layout = read_json(path / LAYOUT_FILE) if (path / LAYOUT_FILE).exists() else {}
    restore_attention(model, layout)  # packed attention projections, held in RAM like the rest of the model
    specs = []
    for name, moe in model.named_modules():
        if not isinstance(moe, MoE):
            continue
        spec = LayerSpec.of(moe)
        q = layout.get("experts", {}).get(name)
        specs.append(spec if q is None else dataclasses.replace(spec, bits=tuple(q["bits"]), group=q["group"]))
        odp = layout.get("odp", {}).get(name)
        if odp is not None:
            moe.gate = ODP(moe.gate, protect=odp["protect"], renormalize=odp["renormalize"])
    return specs


def load_offloaded(path: str | os.PathLike, store: ExpertStore | str | os.PathLike | None = None,
                   budget: float | int = 0.25, low_bit: bool = False, **kw) -> tuple[nn.Module, ExpertServer]:
    """``(model, server)``: a moekit GPT saved by ``GPT.save`` (or MC-MoE's ``save_compressed``) at
    ``path``, served with its experts on disk; the expert weights are never loaded into RAM (they are built on the meta device and
    only the other tensors are read from the safetensors file, verified against its checksum
    first). ``store`` defaults to ``path/experts``, written from the checkpoint (with int8 copies
    if ``low_bit``) when missing, damaged or older than the checkpoint. A ``store`` folder given
    explicitly is written only if it does not exist (or is empty); an existing folder that is not
    an expert store is refused, never replaced. Other keyword arguments go to :func:`offload`."""
    path = Path(path)
    server: ExpertServer | None = None

    def swap(model: GPT, manifest: dict) -> None:
        nonlocal server
        stamp = {"checkpoint": str((path / WEIGHTS_FILE).resolve()), "sha256": manifest["files"][WEIGHTS_FILE]["sha256"]}
        opened = _store_for(path, stamp, store, low_bit or kw.get("low_threshold") is not None)
        layers = moe_layers(model)
        specs = _layer_specs(model, path)  # shapes only: the meta tensors and mcmoe.json know them
        if specs != opened.layers:
            raise ValueError(f"{opened.folder}: written for another model (expert shapes {opened.layers} vs the "
                             f"model's {specs} at {path}); write a store from this model with moekit.offload.write_store")
        if kw.get("future") == "pregate":
            kw["future"] = pregate_future(model, layers)
        server = ExpertServer(opened, budget_bytes(budget, opened), **kw)
        attach(server, layers)

    model = load_without_experts(path, swap)
    server.store.check_model(model)
    return model.to(server.device), server
