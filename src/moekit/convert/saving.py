"""Saving and loading converted models: safetensors + JSON, nothing unpickled.

``save`` writes moekit's GPT with ``GPT.save`` (the conversion is in its config; ``format="hf"``
exports it as Llama / Mixtral instead) and a converted Hugging Face model HF-native when every
layer maps exactly onto a transformers architecture (Mixtral, Qwen2-MoE, Qwen3-MoE), in moekit's
format otherwise (see :mod:`moekit.convert.export`); a Hugging Face MoE whose MoE blocks are
``moekit.MoE`` layers (pruned, merged, quantized) the same way. ``load`` reads all of them: a GPT
folder; a moekit-format folder (FORMAT 2: the base config in ``moekit_convert.json``; FORMAT 1,
written by earlier versions: the base ``config.json``), by building the base architecture from its
config (no weights), putting the same converted modules (or the MoE layers of ``moe_layers``, in
place of the MoE blocks) in place and loading the weights strictly; and
a Hugging Face-native folder moekit wrote, by building it with transformers and patching its MoE
blocks into ``moekit.MoE`` layers. Every folder is checked against its checksums first, and the
model returned by ``load`` (like the one a conversion returns) saves with ``save_pretrained`` too.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from moekit.compress.surgery import build_layer
from moekit.convert.build import ConvertedFFN, RoutingContext
from moekit.convert.export import (
    CONVERT_FILE,
    FORMAT,
    READS,
    WEIGHTS,
    bind_save_pretrained,
    check_format,
    export_hf,
    restore_router_training,
    save_converted,
    tokenizer_files,
)
from moekit.convert.ffn import family_of, find_ffns
from moekit.convert.hf import is_supported_block, patch_hf_model
from moekit.convert.method import ConversionMethod, method_class
from moekit.io import MANIFEST, read_json
from moekit.models import GPT
from moekit.models.gpt import MODEL_FIX, read_config, verify_model

__all__ = ["save", "load", "CONVERT_FILE", "FORMAT"]

_RECORD_ONLY = ("format", "class", "native", "config", "router_training", "moe_layers")  # CONVERT_FILE entries not in moekit_convert


def _gpt_files(tokenizer) -> dict[str, bytes]:
    """A GPT folder's tokenizer file: ``tokenizer.json``, as moekit's GPT folders carry it."""
    files = tokenizer_files(tokenizer)
    if tokenizer is not None and "tokenizer.json" not in files:
        raise ValueError(f"tokenizer {tokenizer}: has no tokenizer.json (a fast tokenizer's file), which a moekit GPT "
                         "folder carries")
    return {"tokenizer.json": files["tokenizer.json"]} if files else {}


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, format: str = "auto") -> Path:
    """Write a converted model (from ``partition``, ``refactor``, ``upcycle`` or ``prune``, or one
    :func:`load` returned), or a Hugging Face MoE with ``moekit.MoE`` layers (``moekit.load``,
    :func:`patch_hf_model`; compressed or not), to ``path`` with the files of ``tokenizer`` (a folder, a
    ``tokenizer.json``, a ``tokenizers.Tokenizer`` or a transformers tokenizer). ``format``:
    ``"auto"`` (a Hugging Face model HF-native when every layer maps, else moekit's format; a GPT
    with ``GPT.save``), ``"hf"`` (HF-native or a ValueError naming what does not map) or
    ``"moekit"``. Returns ``path``."""
    check_format(format)
    if isinstance(model, GPT):
        if format == "hf":
            return export_hf(model, path, tokenizer)
        return model.save(path, files=_gpt_files(tokenizer))
    return save_converted(model, path, tokenizer, format)


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


def _model_class(meta: dict, key: str, meta_file: Path) -> type:
    import transformers

    cls = getattr(transformers, str(meta.get(key)), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{meta_file}: {meta.get(key)!r} is not a transformers model class")
    return cls


def _base_config(path: Path, meta: dict, cls: type, meta_file: Path):
    """The base model's config: in ``CONVERT_FILE`` (FORMAT 2) or ``config.json`` (FORMAT 1)."""
    import transformers

    if meta["format"] == 1:
        return transformers.AutoConfig.from_pretrained(str(path))
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{meta_file}: no base model config; {MODEL_FIX}")
    try:
        return cls.config_class.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{meta_file}: the base model config does not fit {cls.__name__} ({e})") from None


def _install_converted(model: nn.Module, meta: dict, meta_file: Path) -> None:
    """Put the converted layers the record's ``layers`` describe in place of the base model's FFNs."""
    sites = find_ffns(model)
    if family_of(model).name != meta.get("family") or len(sites) != len(meta.get("layers", [])):
        raise ValueError(f"{meta_file}: the saved conversion ({meta.get('family')}, {len(meta.get('layers', []))} "
                         f"FFNs) does not match the model built from its config ({family_of(model).name}, "
                         f"{len(sites)} FFNs)")
    method = _method_of(meta, meta_file)
    context = RoutingContext() if method.routed_by_context else None
    for site, spec in zip(sites, meta["layers"]):
        site.install(_layer(method, spec, site.read().d_model, context))
    method.restore(model, meta, context)


def _install_moe_layers(model: nn.Module, meta: dict, meta_file: Path) -> None:
    """Put the layers the record's ``moe_layers`` describe in place of the base model's MoE blocks."""
    specs = meta["moe_layers"]
    blocks = [n for n, m in model.named_modules() if is_supported_block(m)]
    if not isinstance(specs, dict) or sorted(specs) != sorted(blocks):
        names = sorted(specs) if isinstance(specs, dict) else specs
        raise ValueError(f"{meta_file}: the saved MoE layers {names} do not match the MoE blocks of the model built "
                         f"from its config ({blocks}); {MODEL_FIX}")
    for name in blocks:
        block = model.get_submodule(name)
        try:
            layer = build_layer(specs[name])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{meta_file}: the spec of layer {name} does not build a layer ({e}); {MODEL_FIX}") from None
        layer.hf_block_class = type(block)
        model.set_submodule(name, layer)


def _load_moekit(path: Path, meta: dict, meta_file: Path, dtype: torch.dtype | None) -> nn.Module:
    """A moekit-format folder: the base architecture, its converted (or compressed MoE) layers in
    place, the weights loaded strictly."""
    from safetensors.torch import load_model

    cls = _model_class(meta, "class", meta_file)
    model = cls(_base_config(path, meta, cls, meta_file))
    if "moe_layers" in meta:
        _install_moe_layers(model, meta, meta_file)
    else:
        _install_converted(model, meta, meta_file)
    if dtype is not None:  # after the converted modules are in place, so that they are cast too
        model = model.to(dtype)
    weights = path / WEIGHTS
    try:
        with _readable_weights(weights):
            load_model(model, str(weights), strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
        raise ValueError(f"{weights}: weights do not match {CONVERT_FILE} ({detail[:500]})") from None
    return model


def _load_native(path: Path, meta: dict, meta_file: Path, dtype: torch.dtype | None) -> nn.Module:
    """A Hugging Face-native folder moekit wrote: built by transformers, its MoE blocks patched into moekit's."""
    cls = _model_class(meta, "native", meta_file)
    with _readable_weights(path / WEIGHTS):
        model, info = cls.from_pretrained(str(path), dtype=dtype or "auto", output_loading_info=True)
    wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if wrong:
        raise ValueError(f"{path / WEIGHTS}: weights do not match config.json ({str(wrong)[:300]}); {MODEL_FIX}")
    if any(is_supported_block(m) for m in model.modules()):
        patch_hf_model(model)
        restore_router_training(model, meta.get("router_training", []), str(meta_file))
    return model


def _load_gpt(path: Path, dtype: torch.dtype | None) -> GPT:
    try:
        model = GPT(read_config(path))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: neither a moekit GPT checkpoint nor a converted Hugging Face model "
                         f"({CONVERT_FILE} is missing): {e}") from None
    with _readable_weights(path / WEIGHTS):
        model.load_weights(path, verified=True)
    return (model if dtype is None else model.to(dtype)).eval()


def load(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model written by :func:`save` (moekit GPT, moekit format, Hugging Face-native), in eval mode."""
    path = Path(path)
    meta_file = path / CONVERT_FILE
    if not any((path / n).exists() for n in (MANIFEST, CONVERT_FILE, "config.json")):
        raise FileNotFoundError(f"{path}: no {CONVERT_FILE} / config.json; was it written by moekit.convert.save?")
    man = verify_model(path)
    if CONVERT_FILE not in man["files"]:
        if "config.json" in man["files"]:
            return _load_gpt(path, dtype)
        raise FileNotFoundError(f"{path}: no {CONVERT_FILE} / config.json; was it written by moekit.convert.save?")
    meta = read_json(meta_file, MODEL_FIX)
    if meta.get("format") not in READS:
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} (this moekit reads {list(READS)})")
    load_folder = _load_native if meta.get("native") else _load_moekit
    model = load_folder(path, meta, meta_file, dtype)
    model.moekit_convert = {k: v for k, v in meta.items() if k not in _RECORD_ONLY}
    return bind_save_pretrained(model).eval()
