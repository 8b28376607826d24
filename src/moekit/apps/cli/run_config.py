"""`moekit train --config run.toml`: a run's settings in a TOML file.

The file has the run's data source at the top, a ``[model]`` table and a ``[train]`` table::

    data = "wiki"

    [model]
    ffn = "moe"        # dense, moe or mole
    experts = 8
    k = 2

    [train]
    steps = 2000
    lr = 0.003
    weight_decay = 0.1

``[model]`` takes the model flags of ``moekit train`` (``d_model``, ``layers``, ``table_dtype``...) and
the GPT fields they do not cover (``rope_theta``, ``norm_eps``, ``tie_embeddings``, ``router_args``);
``[train]`` takes every field of :class:`moekit.train.TrainConfig` under its own name (``device`` too). Flags given on the command
line override the file. The run folder keeps the resolved settings as ``config.toml``, which can be
passed back with ``--config``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from moekit.train.trainer import TrainConfig

__all__ = ["MODEL_KEYS", "TRAIN_KEYS", "TOP_KEYS", "CONFIG_FILE", "read_run_config", "run_config_toml"]

CONFIG_FILE = "config.toml"
MODEL_KEYS = ("ffn", "experts", "k", "router", "router_args", "vocab", "d_model", "layers", "heads", "d_ff",
              "rope_theta", "norm_eps", "tie_embeddings", "table_dtype")
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig))
TOP_KEYS = ("data",)
#: file keys whose command-line flag has another name
FLAG_OF = {"warmup_steps": "warmup"}


def _unknown(section: str, got: dict, valid) -> None:
    bad = sorted(set(got) - set(valid))
    if bad:
        raise ValueError(f"{section}: unknown key(s) {bad}; valid keys are {sorted(valid)}")


def read_run_config(path: str | os.PathLike) -> dict:
    """The settings in the TOML file ``path``, keyed by the flag names of ``moekit train`` (``warmup``
    for ``warmup_steps``); unknown keys and tables are refused, naming the valid ones."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {p}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"--config {p}: not a readable TOML file ({e})") from None
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    _unknown(f"--config {p}", doc, (*TOP_KEYS, "model", "train"))
    out = {k: doc[k] for k in TOP_KEYS if k in doc and k not in tables}
    for name, valid in (("model", MODEL_KEYS), ("train", TRAIN_KEYS)):
        section = tables.get(name, {})
        _unknown(f"--config {p} [{name}]", section, valid)
        out.update({FLAG_OF.get(k, k): v for k, v in section.items()})
    return out


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"config: {v} cannot be written to TOML")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"config: cannot write {type(v).__name__} {v!r} to TOML")


def run_config_toml(settings: dict) -> str:
    """The resolved settings (flag names, as :func:`read_run_config` returns them) as a TOML file
    that :func:`read_run_config` reads back to the same values. ``None`` values are left out."""
    flag_to_key = {v: k for k, v in FLAG_OF.items()}
    keyed = {flag_to_key.get(k, k): v for k, v in settings.items() if v is not None}
    _unknown("config", keyed, (*TOP_KEYS, *MODEL_KEYS, *TRAIN_KEYS))
    lines = [f"{k} = {_value(keyed[k])}" for k in TOP_KEYS if k in keyed]
    for name, keys in (("model", MODEL_KEYS), ("train", TRAIN_KEYS)):
        lines += ["", f"[{name}]"] + [f"{k} = {_value(keyed[k])}" for k in keys if k in keyed]
    return "\n".join(lines) + "\n"
