"""Training checkpoints: model, optimizer, RNG and run state in safetensors + JSON (no pickles).

A checkpoint is a folder ``step-000123`` written under a temporary name and renamed when complete;
the file ``latest`` (written atomically) names the newest one. A killed run therefore always
finds a complete checkpoint, and loses at most the steps since it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..io import atomic_write_text

LATEST = "latest"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``folder`` atomically; keep the newest ``keep`` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, meta = _flatten_optimizer(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": meta, **state}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(folder / LATEST, final.name)
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    p = Path(folder) / LATEST
    if not p.exists():
        return None
    ckpt = Path(folder) / p.read_text().strip()
    return ckpt if ckpt.is_dir() else None


def load_checkpoint(ckpt: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG in place; return the saved run state (``step``...)."""
    ckpt = Path(ckpt)
    missing = [f for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
               if not (ckpt / f).exists()]
    if missing:
        raise FileNotFoundError(f"{ckpt}: incomplete checkpoint, missing {missing}")
    state = json.loads((ckpt / "state.json").read_text())
    load_model(model, str(ckpt / "model.safetensors"), strict=True)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")), state.pop("optimizer")))
    torch.set_rng_state(load_file(str(ckpt / "rng.safetensors"))["torch"])
    return state
