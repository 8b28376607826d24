"""Expert parallelism on torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun.

:func:`expert_parallel` turns every MoE layer of a model into its expert-parallel form, in place:
rank ``r`` of the ``N`` ranks of its expert-parallel group keeps experts ``[r*E/N, (r+1)*E/N)`` and
an :class:`AllToAllDispatcher` moves the tokens; routers, attention, embeddings stay replicated
(data parallel). Given a ``(dp, ep)`` :func:`moekit.parallel.parallel_mesh`, each shard also has
``D`` replicas (world ``W = D x N``). After ``backward``, :func:`sync_gradients` averages the
replicated parameters' gradients over the ranks and :func:`sync_expert_gradients` brings the
experts' (which already hold the tokens of their ``ep`` row) to the same mean over the world.
:func:`full_state_dict` gathers the experts back under their global ids, so a model written at one
layout loads at any other: load it into the single-process model, then call :func:`expert_parallel`.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moekit.experts import GroupedExperts
from moekit.layer import MoE
from moekit.parallel.dispatch import AllToAllDispatcher

__all__ = ["clip_grad_norm", "exit_now", "expert_groups", "expert_parallel", "full_state_dict",
           "is_expert_parallel", "sync_expert_gradients", "sync_gradients"]

_SHARDS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


def _moes(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _require_group(group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs a process group: launch with torchrun and call "
                           "torch.distributed.init_process_group('gloo' on CPU, 'nccl' on GPU) first")


def _check_same_everywhere(model: nn.Module, group) -> None:
    """Every rank must build the same model: compare a hash of each MoE layer's shapes and router."""
    desc = [(m.num_experts, m.d_model, m.d_ff, m.experts.activation, type(m.gate).__name__) for m in _moes(model)]
    mine = hashlib.sha256(json.dumps(desc).encode()).hexdigest()
    found: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, mine, group=group)
    if len(set(found)) > 1:
        raise ValueError(f"expert parallelism: the ranks built different models (MoE layers {desc} on rank "
                         f"{dist.get_rank(group)}; layer hashes {found}); give every rank the same config")


def expert_parallel(model: nn.Module, group=None, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard every MoE layer's experts over the ranks of ``group`` (default: the world), in place;
    or, given a ``(dp, ep)`` ``mesh`` (:func:`moekit.parallel.parallel_mesh`), over its ``ep``
    dimension, each shard replicated along ``dp``. Returns the model. The expert count of each layer
    must be divisible by the expert-parallel size."""
    dp_group = None
    if mesh is not None:
        if group is not None or mesh.mesh_dim_names != ("dp", "ep"):
            raise ValueError("expert_parallel: give either a group or a 2-D mesh with mesh_dim_names=('dp', 'ep') "
                             "(moekit.parallel.parallel_mesh), not both")
        group, dp_group = mesh.get_group("ep"), (mesh.get_group("dp") if mesh.size(0) > 1 else None)
    _require_group(group)
    moes = _moes(model)
    if not moes:
        raise ValueError(f"expert_parallel: {type(model).__name__} has no moekit MoE layer")
    everyone = None if mesh is not None else group  # the ranks that hold a copy of the model
    _check_same_everywhere(model, everyone)
    W, r = dist.get_world_size(group), dist.get_rank(group)
    with torch.no_grad():  # the replicated weights start identical everywhere (as DDP makes them): rank 0's
        src = dist.get_global_rank(everyone, 0) if everyone is not None else 0
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src, group=everyone)
    for i, moe in enumerate(moes):
        if moe.num_experts % W:
            raise ValueError(f"expert_parallel: MoE layer {i} has {moe.num_experts} experts, not divisible by the "
                             f"world size {W}; use a world size that divides every layer's expert count")
    for moe in moes:
        E, El = moe.num_experts, moe.num_experts // W
        old = moe.experts
        new = GroupedExperts(El, old.d_model, old.d_ff, old.activation, old.down_proj_bias is not None,
                             old.backend).to(device=old.down_proj.device, dtype=old.down_proj.dtype)
        with torch.no_grad():
            for name in _SHARDS:
                p = getattr(old, name, None)
                if isinstance(p, nn.Parameter):
                    getattr(new, name).copy_(p[r * El:(r + 1) * El])
        for p in new.parameters():
            p.moekit_ep = (r, W, E)  # sharded along dim 0: rank r holds global experts r*El .. (r+1)*El - 1
        moe.experts = new
        moe.dispatcher = AllToAllDispatcher(E, group)
    model.moekit_ep_group, model.moekit_dp_group = group, dp_group
    return model


def expert_groups(model: nn.Module) -> tuple | None:
    """``(ep group, dp group)`` of a model whose experts are sharded (``None`` stands for the world
    and for no replicas, as in torch.distributed), or ``None`` if none is."""
    if not any(is_expert_parallel(p) for p in model.parameters()):
        return None
    return getattr(model, "moekit_ep_group", None), getattr(model, "moekit_dp_group", None)


def exit_now(code: int = 0) -> None:
    """End a worker process that has destroyed its process group, skipping the interpreter's
    teardown: there, gloo's background threads can still be joinable and the C++ runtime aborts
    the process ("terminate called without an active exception", SIGABRT) although its work is done."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_expert_parallel(p: torch.Tensor) -> bool:
    return hasattr(p, "moekit_ep")


def sync_gradients(model: nn.Module, group=None) -> None:
    """After ``loss.backward()`` on every rank (each on its own batch): the mean gradient of the
    mean loss over ranks. Replicated parameters are all-reduced over ``group`` (default: the world)
    and divided by its size; expert shards go through :func:`sync_expert_gradients`. (A replicated
    parameter no rank computed a gradient for keeps ``None``, as in one process.)"""
    _require_group(group)
    W = dist.get_world_size(group)
    replicated = [p for p in model.parameters() if p.requires_grad and not is_expert_parallel(p)]
    if replicated:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in replicated]
        # one all-reduce: the gradients, then how many ranks computed each (a parameter none did keeps
        # no gradient, so the optimizer skips it as it would in one process)
        has = torch.tensor([float(p.grad is not None) for p in replicated], dtype=grads[0].dtype,
                           device=grads[0].device)
        flat = torch.cat([*(g.reshape(-1) for g in grads), has])
        dist.all_reduce(flat, group=group)
        flat /= W
        i = 0
        for p, g, h in zip(replicated, grads, flat[-len(replicated):].tolist()):
            n = g.numel()
            p.grad = flat[i: i + n].view_as(g).clone() if h > 0 else None
            i += n
    sync_expert_gradients(model)


def sync_expert_gradients(model: nn.Module) -> None:
    """After ``loss.backward()`` on every rank: the expert shards' share of the mean gradient of the
    mean loss over the world. A shard's gradient already sums the tokens of every rank of its ``ep``
    group (the all-to-all's backward brought them); it is summed over its replicas (the ``dp``
    group, if any) and divided by the world size ``ep x dp``.

    An expert shard that requires grad but has none (no token of any rank reached this rank's
    experts, so autograd never touched it) gets a zero gradient: in one process the whole ``[E, ...]``
    expert tensor has a gradient, zero on the idle experts, and an optimizer such as AdamW still
    applies its weight decay and moment updates to them; a ``None`` would skip them on this rank only."""
    ep, dp = expert_groups(model) or (None, None)
    _require_group(ep)
    world = dist.get_world_size(ep) * (dist.get_world_size(dp) if dp is not None else 1)
    shards = [p for p in model.parameters() if is_expert_parallel(p) and p.requires_grad]
    for p in shards:
        if p.grad is None:  # idle local experts: the zeros one process would have
            p.grad = torch.zeros_like(p)
    if dp is not None and shards:
        flat = torch.cat([p.grad.reshape(-1) for p in shards])
        dist.all_reduce(flat, group=dp)
        for p, g in zip(shards, flat.split([p.numel() for p in shards])):
            p.grad.copy_(g.view_as(p))
    for p in shards:
        p.grad /= world


def clip_grad_norm(model: nn.Module, max_norm: float, group=None) -> float:
    """``clip_grad_norm_`` over the whole (sharded) model: the norm counts every expert shard once
    (summed over ``group``, default the model's expert-parallel group; replicas count once) and the
    replicated parameters once, so every rank scales by the same factor (a per-rank norm would let
    the replicated weights drift apart). Returns the total norm."""
    group = _ep_group(model, group)
    _require_group(group)
    rep = [p.grad for p in model.parameters() if p.grad is not None and not is_expert_parallel(p)]
    shard = [p.grad for p in model.parameters() if p.grad is not None and is_expert_parallel(p)]
    sq = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for g in shard:
        sq += g.double().pow(2).sum()
    dist.all_reduce(sq, group=group)
    for g in rep:
        sq += g.double().pow(2).sum()
    total = float(sq.sqrt())
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for g in rep + shard:
            g.mul_(scale)
    return total


def _ep_group(model: nn.Module, group):
    """``group``, or if ``None`` the model's expert-parallel group (``None``, the world, if it has none)."""
    return group if group is not None else (expert_groups(model) or (None,))[0]


def full_state_dict(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor gathered from the ranks of ``group`` (default:
    the model's expert-parallel group) under its global ids (the single-process layout). Every rank
    must call it; every rank gets the full dict."""
    group = _ep_group(model, group)
    _require_group(group)
    W = dist.get_world_size(group)
    out = {}
    for name, t in model.state_dict().items():
        owner = _param_of(model, name)
        if owner is not None and is_expert_parallel(owner):
            parts = [torch.empty_like(t) for _ in range(W)]
            dist.all_gather(parts, t.contiguous(), group=group)
            out[name] = torch.cat(parts, 0)
        else:
            out[name] = t
    return out


def _param_of(model: nn.Module, name: str):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return mod._parameters.get(attr)
