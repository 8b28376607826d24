"""Loading a GPT saved by ``GPT.save`` without materialising its experts.

For models whose experts are served from elsewhere (an expert store, a MoLE lookup table): the
checkpoint is verified against its checksums, the model is built from its config with every
:class:`~moekit.experts.GroupedExperts` on the meta device, the caller swaps the modules that hold
experts for its own, and every tensor the model still has is read from the verified safetensors
file (the tied embedding, saved once under either name, fills both).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from moekit.experts import experts_on_meta
from moekit.models.gpt import GPT, WEIGHTS_FILE, read_config, verify_model

__all__ = ["load_without_experts", "read_weights"]

#: a tied weight is saved once, under either name
TIED = {"embed.weight": "head.weight", "head.weight": "embed.weight"}


def load_without_experts(path: str | os.PathLike, swap: Callable[[GPT, dict], None]) -> GPT:
    """The GPT saved at ``path``, its experts never loaded: ``swap(model, manifest)`` (``manifest``:
    the checkpoint's verified manifest, see :func:`~moekit.models.gpt.verify_model`) replaces every
    module that holds experts (still on the meta device); the other tensors are then read from the
    checkpoint (:func:`read_weights`). Returns the model in eval mode, on the CPU."""
    manifest = verify_model(path)  # every tensor read below is the one saved
    with experts_on_meta(), torch.random.fork_rng(devices=[]):  # initialised, then overwritten: leave the RNG be
        model = GPT(read_config(path))
    swap(model, manifest)
    read_weights(model, path)
    return model.eval()


def read_weights(model: GPT, path: str | os.PathLike) -> None:
    """Load every tensor of ``model.state_dict()`` from the checkpoint at ``path`` (verified by the
    caller), strictly: a tensor the file lacks is an error."""
    weights = Path(path) / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        state = {}
        for n in model.state_dict():
            src = n if n in keys else TIED.get(n)
            if src not in keys:
                raise ValueError(f"{weights}: no tensor {n!r}; was it written by GPT.save for this config?")
            state[n] = f.get_tensor(src)
    model.load_state_dict(state, strict=True)
