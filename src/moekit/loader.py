"""One loader and one ``generate`` for every model folder moekit reads.

:func:`load` tells the kind of a folder from its files and builds the model:

- ``gpt``: written by ``GPT.save`` / ``moekit train`` (``config.json`` is a GPTConfig) -> a
  :class:`moekit.models.GPT` (with its mixed-precision experts when ``moekit.compress`` quantized
  them: ``mcmoe.json``);
- ``mole``: a GPT whose FFNs are MoLE -> the GPT serving its lookup table when one is found
  (``table=``, or ``mole_table`` inside or beside the folder), else its train form;
- ``converted``: written by ``moekit.convert.save`` (``moekit_convert.json``), in moekit's format or
  Hugging Face-native (Mixtral, Qwen2-/Qwen3-MoE, Llama) -> the converted model; a Hugging Face
  MoE compressed by ``moekit compress`` (its ``compression`` in that record) is one too;
- ``hf``: any other Hugging Face causal-LM folder, dense or MoE -> ``AutoModelForCausalLM``, with
  its MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) as ``moekit.MoE`` layers, whose
  ``save_pretrained`` then writes what this loader reads back (``moekit.convert.save``: the
  architecture itself while every layer maps onto it, moekit's format once compression made one
  that does not).

:func:`load_tokenizer` finds the tokenizer that goes with a folder and :func:`generate` continues
token ids with either kind of model under the same options (:class:`moekit.ops.sampling.Sampling`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.compress.mcmoe import LAYOUT_FILE, load_compressed
from moekit.convert import load as load_converted
from moekit.convert import patch_hf_model
from moekit.convert.export import bind_save_pretrained
from moekit.convert.hf import is_supported_block
from moekit.convert.saving import CONVERT_FILE
from moekit.data import load_tokenizer as load_bpe
from moekit.data.tokenizer import EOS
from moekit.io import kind_of
from moekit.models import GPT
from moekit.models.gpt import read_config
from moekit.models.mole import load_served
from moekit.ops.sampling import Sampling
from moekit.parallel import resolve_device

__all__ = ["ModelInfo", "describe", "load", "load_tokenizer", "generate", "TABLE_NAME"]

#: the folder name of a MoLE lookup table, as ``moekit train --ffn mole`` and the demo write it
TABLE_NAME = "mole_table"
KINDS = ("gpt", "mole", "converted", "hf")


@dataclass(frozen=True)
class ModelInfo:
    kind: str  # one of KINDS
    path: Path
    table: Path | None = None  # MoLE: the lookup table that will be served
    architecture: str | None = None  # a Hugging Face folder's (or a natively exported conversion's) class
    compression: str | None = None  # converted: the moekit.compress method of a compressed Hugging Face MoE

    def describe(self) -> str:
        if self.kind == "mole":
            return (f"MoLE GPT at {self.path}, experts read from the table {self.table}" if self.table else
                    f"MoLE GPT at {self.path} in its train form (no {TABLE_NAME} found: experts computed)")
        if self.kind == "converted":
            form = f"Hugging Face-native {self.architecture}" if self.architecture else "moekit format"
            what = f"Hugging Face MoE compressed by {self.compression}" if self.compression else "converted model"
            return f"{what} ({form}) at {self.path}"
        return {"gpt": "moekit GPT", "hf": f"Hugging Face {self.architecture or 'model'}"}[self.kind] + f" at {self.path}"


def _config(path: Path) -> dict | None:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _architecture(cfg: dict | None) -> str | None:
    """The transformers class a Hugging Face ``config.json`` names (none for moekit's own format)."""
    if not cfg or cfg.get("model_type") in (None, "moekit"):
        return None
    archs = cfg.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else str(cfg["model_type"])


def _compression(path: Path) -> str | None:
    """The compression a ``CONVERT_FILE`` records (its method; ``"an unrecorded method"`` for MoE layers saved
    without one), or ``None`` for a conversion (or a record that cannot be read: loading says why)."""
    try:
        record = json.loads((path / CONVERT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    method = record.get("compression", {}).get("method") if isinstance(record.get("compression"), dict) else None
    return str(method) if method else "an unrecorded method" if "moe_layers" in record else None


def _find_table(path: Path, table: str | os.PathLike | None) -> Path | None:
    if table is not None:
        if not Path(table).is_dir():
            raise FileNotFoundError(f"table {table}: no such folder; give the folder reparameterize() wrote")
        return Path(table)
    for candidate in (path / TABLE_NAME, path.parent / TABLE_NAME):
        if kind_of(candidate) is not None:
            return candidate
    return None


def describe(path: str | os.PathLike, table: str | os.PathLike | None = None) -> ModelInfo:
    """The kind of the model folder ``path`` (see the module docstring); a clear error otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder; give a model folder")
    if kind_of(path) == "train-run" and (path / "model").is_dir():
        raise ValueError(f"{path}: a moekit training run, not a model; its model is {path / 'model'}")
    cfg = _config(path)
    arch = _architecture(cfg)
    if (path / CONVERT_FILE).exists():
        return ModelInfo("converted", path, architecture=arch, compression=_compression(path))
    if cfg is None:
        raise ValueError(f"{path}: not a model folder (no readable config.json); give a folder written by "
                         "moekit (train, convert, save) or a Hugging Face model folder")
    if "model_type" in cfg:
        return ModelInfo("hf", path, architecture=arch)
    if "d_model" in cfg and "n_layers" in cfg:
        mole = any(isinstance(s, dict) and s.get("kind") == "mole" for s in cfg.get("ffn") or [])
        return ModelInfo("mole", path, _find_table(path, table)) if mole else ModelInfo("gpt", path)
    raise ValueError(f"{path}/config.json is neither a moekit GPT config nor a Hugging Face config (no model_type)")


def _load_hf(path: Path, dtype: torch.dtype | None) -> nn.Module:
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: transformers cannot load this folder as a causal LM ({first[:300]})") from None
    if any(is_supported_block(m) for m in model.modules()):
        bind_save_pretrained(patch_hf_model(model))
    return model.eval()


def load(path: str | os.PathLike, *, table: str | os.PathLike | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, cache_bytes: int = 0) -> nn.Module:
    """The model in the folder ``path``, in eval mode on ``device`` (``auto``: CUDA if present).

    ``table``: a MoLE model's lookup table (default: ``mole_table`` in or beside ``path``);
    ``cache_bytes``: the RAM row cache of that table. The MoE blocks of a Hugging Face MoE
    (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) become ``moekit.MoE`` layers computing the same thing."""
    info = describe(path, table)
    if info.kind == "converted":
        model = load_converted(info.path, dtype)
    elif info.kind == "hf":
        model = _load_hf(info.path, dtype)
    elif info.kind == "mole" and info.table is not None:
        model = load_served(info.path, info.table, cache_bytes)
    elif (info.path / LAYOUT_FILE).exists():
        model = load_compressed(info.path)
    else:
        read_config(info.path)  # checked against its checksum before anything else
        model = GPT.load(info.path)
    if dtype is not None and info.kind in ("gpt", "mole"):
        model = model.to(dtype)
    return model.to(resolve_device(device)).eval()


class _Codec:
    """Text <-> token ids for either a ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def __init__(self, tok, eos: list[int]) -> None:
        self.tok, self.eos = tok, eos

    def encode(self, text: str) -> list[int]:
        out = self.tok.encode(text)
        return list(out.ids if hasattr(out, "ids") else out)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        if hasattr(self.tok, "token_to_id"):
            return self.tok.token_to_id(text)
        i = self.tok.convert_tokens_to_ids(text)
        return None if i is None or i == self.tok.unk_token_id else int(i)


def _hf_tokenizer(path: Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_tokenizer(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> _Codec:
    """The tokenizer of the model folder ``path`` (or the file/folder ``tokenizer``), with its
    end-of-sequence ids: a moekit tokenizer's ``<|endoftext|>``, a Hugging Face model's ``eos_token_id``."""
    path = Path(path)
    hf = describe(path).kind in ("hf", "converted")
    tok = None
    if tokenizer is None and hf:
        tok = _hf_tokenizer(path)
    if tok is None:
        where = Path(tokenizer) if tokenizer is not None else next(
            (f / "tokenizer.json" for f in (path, path.parent) if (f / "tokenizer.json").exists()), None)
        if where is None:
            raise FileNotFoundError(f"{path}: no tokenizer in the folder or beside it; pass the tokenizer.json")
        tok = load_bpe(where)
    if hasattr(tok, "token_to_id"):
        eos = [tok.token_to_id(EOS)] if tok.token_to_id(EOS) is not None else []
    else:
        e = tok.eos_token_id
        eos = [] if e is None else [e] if isinstance(e, int) else list(e)
    return _Codec(tok, eos)


@torch.no_grad()
def generate(model: nn.Module, ids_BT: torch.Tensor, max_new_tokens: int, sampling: Sampling | None = None,
             eos_token_id: int | Sequence[int] | None = None, seed: int | None = None) -> torch.Tensor:
    """Continue ``ids`` with a moekit GPT or a transformers causal LM under the same options;
    returns ``[B, T + new]`` (rows that ended are padded with their end-of-sequence token)."""
    sampling = sampling or Sampling()
    device = next(model.parameters()).device
    ids_BT = ids_BT.to(device)
    if isinstance(model, GPT):
        gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
        return model.generate(ids_BT, max_new_tokens, sampling.temperature, gen, top_k=sampling.top_k,
                              top_p=sampling.top_p, eos_token_id=eos_token_id)
    eos = None if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    options = {"do_sample": False} if sampling.greedy else {
        "do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k or 0,
        "top_p": 1.0 if sampling.top_p is None else sampling.top_p}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(ids_BT, attention_mask=torch.ones_like(ids_BT), max_new_tokens=max_new_tokens,
                              min_new_tokens=0, eos_token_id=eos, pad_token_id=eos[0] if eos else None, **options)
