"""Training checkpoints: model, optimizer, RNG and run state in safetensors + JSON (no pickles).

A checkpoint is a folder ``step-0000123`` with a ``moekit.json`` manifest (the SHA-256 of each
file, the step, the run it belongs to). It is written whole under a temporary name and renamed
when complete, so under its final name it is complete or absent; saving a step that already
exists swaps the new folder in atomically (the old copy is removed only after). The file
``latest`` names the newest checkpoint for people; :func:`find_checkpoint` does not trust it: it
takes the newest checkpoint that verifies and reports the ones it skipped. Checkpoints hold
finite weights only: :func:`save_checkpoint` refuses a model with a NaN or inf parameter.

A model whose experts are sharded (:func:`moekit.parallel.expert_parallel`) is saved as one
checkpoint per shard, each recording its layout (which parameters are shards, and the optimizer's
parameter order). :func:`load_checkpoint` takes the shards of one step in order, joins them under
the experts' global ids and gives the model it loads into its own slice, so a checkpoint written at
one layout (one process, data parallel, any expert-parallel size) loads at any other, on any device.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model

from moekit.io import (
    FolderWriter,
    IntegrityError,
    MoekitWarning,
    atomic_write_text,
    claim_folder,
    clean_stale,
    fault_point,
    kind_of,
    publish,
    read_json,
    read_manifest,
    remove_folder,
    staging_dir,
    verify,
    write_manifest,
)
from moekit.parallel import is_expert_parallel

__all__ = ["KIND", "LATEST", "all_finite", "find_checkpoint", "latest_checkpoint", "load_checkpoint", "list_checkpoints",
           "step_folders",
           "prune_checkpoints", "save_checkpoint", "set_aside"]

LATEST = "latest"
KIND = "checkpoint"
FOLDER_KIND = "checkpoints"
_STEP = re.compile(r"^step-(\d+)$")


def all_finite(tensors) -> bool:
    """Whether every tensor holds finite values only (one reduction per tensor, one sync)."""
    tensors = [t.detach() for t in tensors if t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([t.abs().amax().float() for t in tensors]).isfinite().all())


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
                    state: dict, keep: int = 2, run: str | None = None, prune: bool = True) -> Path:
    """Write checkpoint ``step`` of run ``run`` under ``folder``, then (``prune``) keep it and the
    newest ``keep - 1`` earlier ones of that run, and remove those of any other run (an overwritten
    one): see :func:`prune_checkpoints`."""
    folder = Path(folder)
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep}")
    if not all_finite(model.parameters()):
        raise ValueError(f"save_checkpoint: the model has NaN or inf weights at step {step}; not checkpointed")
    claim_folder(folder, FOLDER_KIND, "checkpoint folder")
    clean_stale(folder)
    final = folder / f"step-{step:07d}"
    tmp = staging_dir(final)
    try:
        w = FolderWriter(tmp, KIND)
        w.write("model.safetensors", lambda p: save_model(model, p))
        tensors, meta = _flatten_optimizer(optimizer)
        w.write("optimizer.safetensors", lambda p: save_file(tensors, p))
        w.write("rng.safetensors", lambda p: save_file(_rng_states(model), p))
        w.write_json("state.json", {"step": step, "run": run, "optimizer": meta, "layout": _layout(model, optimizer),
                                    **state})
        fault_point("manifest")
        write_manifest(tmp, KIND, w.files, {"step": step, "run": run})
        if final.exists() and kind_of(final) != KIND:  # unreadable manifest: set aside, never deleted
            aside = set_aside(final)
            warnings.warn(f"{final}: a damaged checkpoint of the same step was moved to {aside.name}", MoekitWarning,
                          stacklevel=2)
        publish(tmp, final, KIND)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("latest")
    atomic_write_text(folder / LATEST, final.name + "\n")
    if prune:
        fault_point("prune")
        prune_checkpoints(folder, step, keep, run)
    return final


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``NAME.damaged-TIME``: out of every search, never deleted."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(path, aside)
    return aside


def prune_checkpoints(folder: str | os.PathLike, step: int, keep: int, run: str | None) -> None:
    """Keep checkpoint ``step`` of ``run`` and the newest ``keep - 1`` earlier ones of that run;
    remove the earlier others and every checkpoint of another run (all moekit's, by their
    manifests). Checkpoints of this run after ``step`` are left alone."""
    found = list_checkpoints(folder)
    mine = [p for s, p, r in found if r == run and s <= step]
    for s, p, r in found:
        if (r != run or s < step) and p not in mine[-keep:]:
            remove_folder(p, KIND)


def step_folders(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` folder under ``folder`` (complete or not), oldest first."""
    folder = Path(folder)
    found = [(int(m[1]), p) for p in (folder.iterdir() if folder.is_dir() else ())
             if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found)


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path, str | None]]:
    """``(step, path, run)`` of the complete checkpoints under ``folder`` (by their manifests, not
    verified), oldest first."""
    out = []
    for step, p in step_folders(folder):
        try:
            man = read_manifest(p, KIND, "")
        except (OSError, IntegrityError):
            continue
        out.append((step, p, man.get("run")))
    return out


def find_checkpoint(folder: str | os.PathLike, run: str | None = None,
                    at_most: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``folder`` (of run ``run`` if given, at step ``at_most`` or before)
    whose every file verifies, and ``(path, why)`` of each newer one skipped because it does not. A
    checkpoint swap a kill interrupted is completed first."""
    clean_stale(folder)
    skipped = []
    for s, p in reversed(step_folders(folder)):
        if at_most is not None and s > at_most:
            continue
        try:
            if run is not None and read_manifest(p, KIND, "").get("run") != run:
                continue  # another run's (one started again with --overwrite): not ours to resume
            verify(p, KIND, "skipped")
        except (IntegrityError, FileNotFoundError) as e:
            skipped.append((p, str(e)))
            continue
        return p, skipped
    return None, skipped


def latest_checkpoint(folder: str | os.PathLike, run: str | None = None) -> Path | None:
    """The newest verified checkpoint under ``folder`` (see :func:`find_checkpoint`), or ``None``."""
    return find_checkpoint(folder, run)[0]


def _rng_states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    device = _device(model)
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _layout(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a checkpoint needs to load at another layout: the optimizer's parameters by name (in its
    order), the expert shards by name, and which shard this is (``[rank, of]``, or ``None``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    shard = next((p.moekit_ep[:2] for p in model.parameters() if is_expert_parallel(p)), None)
    return {"params": [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]],
            "sharded": [n for n, p in model.named_parameters() if is_expert_parallel(p)],
            "shard": list(shard) if shard else None}


def _joined(parts: list[dict[str, torch.Tensor]], sharded) -> dict[str, torch.Tensor]:
    """One state from the shards' (in shard order): the tensors of ``sharded`` concatenated along the
    expert dim, every other one (replicated, or a scalar) the first shard's."""
    return {k: torch.cat([p[k] for p in parts]) if k in sharded else t for k, t in parts[0].items()}


def _own_slice(t: torch.Tensor, p: torch.Tensor, what: str) -> torch.Tensor:
    """The part of the whole expert tensor ``t`` that parameter ``p`` holds (all of it unless ``p`` is a shard)."""
    if not is_expert_parallel(p):
        return t
    r, W, E = p.moekit_ep
    if t.dim() == 0 or t.shape[0] != E:
        raise ValueError(f"{what}: holds {t.shape[0] if t.dim() else 0} experts, the model {E}; load it into a "
                         "model of the run's own config")
    El = E // W
    return t[r * El:(r + 1) * El]


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    own = dict(model.named_parameters())
    missing, unexpected = model.load_state_dict(
        {k: _own_slice(t, own[k], f"{where}: {k}") if k in own else t for k, t in weights.items()}, strict=False)
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in weights if k in current}
    missing = [k for k in missing if current[k].data_ptr() not in loaded]  # a tied weight is loaded with its twin
    if missing or unexpected:
        raise ValueError(f"{where}: the checkpoint does not fit the model (missing {missing}, unexpected "
                         f"{unexpected}); load it into a model of the run's own config")


def _optimizer_state(parts: list[dict[str, torch.Tensor]], meta: dict, layout: dict, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, where: Path) -> dict:
    """The optimizer state dict of the model's own slice, from the shards' flattened tensors."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = _layout(model, optimizer)["params"]
    saved = layout.get("params", names)
    if saved != names:
        raise ValueError(f"{where}: the checkpoint's optimizer holds other parameters than the model's; load it into "
                         "a model of the run's own config")
    sharded = set(layout.get("sharded", []))
    joined = _joined(parts, {k for k, t in parts[0].items() if t.dim() and saved[int(k.split(".")[0])] in sharded})
    tensors = {k: _own_slice(t, params[int(k.split(".")[0])], f"{where}: optimizer {k}") if t.dim() else t
               for k, t in joined.items()}
    return _unflatten_optimizer(tensors, meta)


def load_checkpoint(ckpt: str | os.PathLike | Sequence[str | os.PathLike], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, verified: bool = False) -> dict:
    """Verify checkpoint ``ckpt`` (unless the caller just did: ``verified``), restore model,
    optimizer and RNG in place; return the saved run state (``step``, ``history``...).

    ``ckpt`` is one checkpoint folder, or the folders of every expert shard of one step in shard
    order: their experts are joined, and a sharded ``model`` keeps its own slice. Tensors are read
    to the CPU and copied to wherever the model and its optimizer state live; the RNG restored is
    that of the shard of the model's own expert-parallel rank (the first one when unsharded)."""
    shards = [Path(ckpt)] if isinstance(ckpt, (str, os.PathLike)) else [Path(p) for p in ckpt]
    fix = "resume from an earlier checkpoint (delete this one) or start a new run"
    if not verified:
        for s in shards:
            verify(s, KIND, fix)
    states = [read_json(s / "state.json", fix) for s in shards]
    order = [(st.get("layout") or {}).get("shard") for st in states]
    if len(shards) > 1 and any(o is not None and o != [i, len(shards)] for i, o in enumerate(order)):
        raise ValueError(f"load_checkpoint: {[str(s) for s in shards]} are not the {len(shards)} shards of one "
                         f"checkpoint in order (they say {order}); give every shard's folder, in rank order")
    state = states[0]
    layout = state.pop("layout", None) or {"sharded": [n for n, p in model.named_parameters() if is_expert_parallel(p)]}
    weights = _joined([load_file(str(s / "model.safetensors")) for s in shards], set(layout["sharded"]))
    _load_weights(model, weights, shards[0])
    parts = [load_file(str(s / "optimizer.safetensors")) for s in shards]
    optimizer.load_state_dict(_optimizer_state(parts, state.pop("optimizer"), layout, model, optimizer, shards[0]))
    rank = next((p.moekit_ep[0] for p in model.parameters() if is_expert_parallel(p)), 0)
    rng = load_file(str(shards[rank % len(shards)] / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and _device(model).type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], _device(model))
    return state
