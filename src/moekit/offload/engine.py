"""Text generation with a moekit GPT whose experts stay on disk: :class:`Engine` and ``moekit generate``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from moekit.data import load_tokenizer
from moekit.offload.checkpoint import load_offloaded
from moekit.offload.runtime import ServeStats

__all__ = ["Engine", "find_tokenizer", "parse_budget"]


def parse_budget(text: str | float | int) -> float | int:
    """``"25%"`` -> 0.25 (a fraction of the experts' bytes); ``"64MiB"``, ``"1.5GB"``, ``"300000"`` -> bytes."""
    if isinstance(text, (int, float)):
        return text
    t = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[kKmMgG]i?[bB]|[bB])?", t)
    if not m:
        raise ValueError(f"budget: {text!r} is not a percentage (25%), a fraction (0.25) or a size (64MiB, 300000)")
    value, unit = float(m.group(1)), (m.group(2) or "")
    if unit == "%":
        if not 0 < value <= 100:
            raise ValueError(f"budget: {text!r}: a percentage must lie in (0, 100]")
        return value / 100
    if not unit:
        return value if value <= 1 else int(value)
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(unit[0].lower(), 1)
    if "i" in unit.lower():
        scale = {"k": 2**10, "m": 2**20, "g": 2**30}[unit[0].lower()]
    return int(value * scale)


def find_tokenizer(model_dir: str | os.PathLike):
    """The ``tokenizers`` tokenizer saved beside a model (``tokenizer.json`` in its folder or the run
    folder above it, as ``moekit train`` writes), or ``None``."""
    for folder in (Path(model_dir), Path(model_dir).parent):
        if (folder / "tokenizer.json").exists():
            return load_tokenizer(folder / "tokenizer.json")
    return None


class Engine:
    """A saved moekit GPT served with its experts on disk behind a byte-budgeted cache.

    Args:
        model_dir: written by ``GPT.save`` (``moekit train``, ``moekit demo``).
        store: the expert store (default ``model_dir/experts``, written on first use).
        budget: the cache, a fraction of all experts' bytes (``0.25``) or bytes.
        tokenizer: a ``tokenizers.Tokenizer``; default: ``tokenizer.json`` beside the model.
        **serve: ``policy``, ``partition``, ``prefetch`` (``"gate"``), ``low_threshold``, ``direct``,
            ``device``, ``host``... (see :class:`moekit.offload.ExpertServer`).
    """

    def __init__(self, model_dir: str | os.PathLike, store: str | os.PathLike | None = None, budget: float | int = 0.25,
                 tokenizer=None, **serve) -> None:
        self.model, self.server = load_offloaded(model_dir, store, budget, **serve)
        self.tokenizer = tokenizer if tokenizer is not None else find_tokenizer(model_dir)

    @torch.no_grad()
    def generate(self, prompt: str | torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int | None = None, **options) -> str | torch.Tensor:
        """Continue ``prompt`` (text, with a tokenizer; or ``[B, T]`` token ids): returns the text
        of the new tokens, or all the ids. ``options``: ``top_k``, ``top_p``, ``eos_token_id`` (see
        :meth:`moekit.models.GPT.generate`)."""
        device = self.server.device
        gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("Engine.generate: a text prompt needs a tokenizer; pass tokenizer= or token ids")
            ids = torch.tensor([self.tokenizer.encode(prompt).ids], device=device)
            if ids.shape[1] == 0:
                raise ValueError("Engine.generate: the prompt is empty")
            out = self.model.generate(ids, max_new_tokens, temperature, gen, **options)
            return self.tokenizer.decode(out[0, ids.shape[1]:].tolist())
        return self.model.generate(prompt.to(device), max_new_tokens, temperature, gen, **options)

    def stats(self) -> ServeStats:
        return self.server.stats()

    def close(self) -> None:
        self.server.close()
