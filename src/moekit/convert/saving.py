"""Saving and loading converted models: safetensors + JSON, nothing unpickled.

moekit's GPT records the conversion in its own config (``GPT.save`` / ``GPT.load``). A converted
Hugging Face model is saved as the base model's ``config.json``, ``moekit_convert.json`` (family,
model class, method, settings and each layer's expert layout) and ``model.safetensors``; loading
builds the base architecture from its config (no weights), puts the same converted modules in
place and loads the weights strictly.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from moekit.convert.build import ConvertedFFN, RoutingContext
from moekit.convert.ffn import family_of, find_ffns
from moekit.convert.method import ConversionMethod, method_class
from moekit.io import MANIFEST, read_json, write_folder
from moekit.models import GPT
from moekit.models.gpt import MODEL_FIX, MODEL_KIND, read_config, verify_model

__all__ = ["save", "load", "CONVERT_FILE"]

CONVERT_FILE = "moekit_convert.json"
WEIGHTS = "model.safetensors"
FORMAT = 1


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a converted model (from ``partition``, ``refactor``, ``upcycle`` or ``prune``) to ``path``."""
    from safetensors.torch import save_model

    path = Path(path)
    if isinstance(model, GPT):
        return model.save(path)
    info = getattr(model, "moekit_convert", None)
    if info is None:
        raise ValueError("moekit.convert.save: the model was not converted by moekit.convert "
                         "(use model.save_pretrained for plain transformers models)")
    meta = {"format": FORMAT, "class": type(model).__name__, **info}
    with write_folder(path, MODEL_KIND, "model folder") as w:
        w.write(WEIGHTS, lambda tmp: save_model(model, tmp))
        w.write_text("config.json", model.config.to_json_string())
        w.write_text(CONVERT_FILE, json.dumps(meta, indent=1))
    return path


def _layer(method: type[ConversionMethod], spec: dict, d_model: int, context: RoutingContext | None) -> nn.Module:
    """The converted layer ``method`` builds for ``spec``, fresh weights, with its down bias if it has one."""
    out_bias = torch.zeros(d_model) if spec.get("out_bias") else None
    return ConvertedFFN(method.empty_layer(spec, d_model), out_bias, context)


@contextmanager
def _readable_weights(weights: Path):
    """Turn safetensors' own error for a truncated or corrupt file into a ValueError naming the file."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _method_of(meta: dict, meta_file: Path) -> type[ConversionMethod]:
    try:
        return method_class(str(meta.get("method")))
    except ValueError as e:
        raise ValueError(f"{meta_file}: {e}") from None


def load(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model written by :func:`save` (moekit GPT or Hugging Face)."""
    from safetensors.torch import load_model

    path = Path(path)
    meta_file = path / CONVERT_FILE
    if not (path / MANIFEST).exists() and not (path / CONVERT_FILE).exists() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no {CONVERT_FILE} / config.json; was it written by moekit.convert.save?")
    man = verify_model(path)
    if CONVERT_FILE not in man["files"]:
        if "config.json" in man["files"]:
            try:
                model = GPT(read_config(path))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: neither a moekit GPT checkpoint nor a converted Hugging Face model "
                                 f"({CONVERT_FILE} is missing): {e}") from None
            with _readable_weights(path / WEIGHTS):
                model.load_weights(path, verified=True)
            return (model if dtype is None else model.to(dtype)).eval()
        raise FileNotFoundError(f"{path}: no {CONVERT_FILE} / config.json; was it written by moekit.convert.save?")
    meta = read_json(meta_file, MODEL_FIX)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} (this moekit reads {FORMAT})")
    import transformers

    cls = getattr(transformers, str(meta.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{meta_file}: {meta.get('class')!r} is not a transformers model class")
    config = transformers.AutoConfig.from_pretrained(str(path))
    model = cls(config)
    sites = find_ffns(model)
    if family_of(model).name != meta["family"] or len(sites) != len(meta["layers"]):
        raise ValueError(f"{meta_file}: the saved conversion ({meta['family']}, {len(meta['layers'])} FFNs) does not "
                         f"match the model built from config.json ({family_of(model).name}, {len(sites)} FFNs)")
    method = _method_of(meta, meta_file)
    context = RoutingContext() if method.routed_by_context else None
    for site, spec in zip(sites, meta["layers"]):
        site.install(_layer(method, spec, site.read().d_model, context))
    method.restore(model, meta, context)
    if dtype is not None:  # after the converted modules are in place, so that they are cast too
        model = model.to(dtype)
    weights = path / WEIGHTS
    try:
        with _readable_weights(weights):
            load_model(model, str(weights), strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
        raise ValueError(f"{weights}: weights do not match {CONVERT_FILE} ({detail[:500]})") from None
    model.moekit_convert = {k: v for k, v in meta.items() if k not in ("format", "class")}
    return model.eval()
