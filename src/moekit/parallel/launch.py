"""Devices and process groups: the device a run uses, the process group torchrun sets up (NCCL on
CUDA, gloo on CPU), and the 2-D mesh of expert parallelism x data parallelism.

``torchrun --nproc-per-node W ...`` starts ``W`` processes; :func:`init_distributed` joins them
(each CUDA process on its own GPU, ``LOCAL_RANK``). :func:`parallel_mesh` arranges them as
``D x N`` (``mesh_dim_names=("dp", "ep")``): the ``N`` ranks of a row hold one expert shard each
and exchange tokens over the ``"ep"`` group; the ``D`` ranks of a column hold the same shard and
average its gradients over the ``"dp"`` group. World rank ``r`` is row ``r // N``, column ``r % N``.
"""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["DEVICES", "device_name", "init_distributed", "parallel_mesh", "resolve_device"]

#: the device names a run accepts (``cuda:N`` too); ``auto``: CUDA where there is a GPU, else the CPU
DEVICES = ("auto", "cpu", "cuda")


def device_name(device: str | torch.device) -> str:
    """``device`` as a checked name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is
    :func:`resolve_device`'s question)."""
    name = str(device) if isinstance(device, torch.device) else device
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    return name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` of ``device``: ``auto`` is CUDA where available, else the CPU; plain
    ``cuda`` in a torchrun process is its own GPU (``LOCAL_RANK``). Asking for CUDA where there is
    none is a one-line ``ValueError``."""
    name = device_name(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"{torch.cuda.device_count()} GPUs visible); use the device 'cpu' or 'auto'")
    if name == "cuda":
        if "LOCAL_RANK" in os.environ:
            index = int(os.environ["LOCAL_RANK"])
        elif dist.is_initialized():
            index = dist.get_rank() % torch.cuda.device_count()
        else:
            index = torch.cuda.current_device()
        name = f"cuda:{index}"
    if torch.device(name).index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPUs are visible; start at most that "
                         "many processes per node, or use another index")
    return torch.device(name)


def init_distributed(device: str | torch.device = "auto") -> tuple[int, int]:
    """Join the process group of a torchrun launch: NCCL when ``device`` resolves to CUDA (each
    process on the GPU of its ``LOCAL_RANK``), gloo on the CPU. Returns ``(rank, world size)``;
    ``(0, 1)`` in a process torchrun did not start. A group already joined is kept."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            return 0, 1
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)  # bound to its GPU: barriers and collectives use it
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def parallel_mesh(expert_parallel: int, device: str | torch.device = "auto") -> DeviceMesh:
    """The world as a ``(dp, ep)`` mesh of ``world / expert_parallel`` data-parallel replicas of
    ``expert_parallel`` expert shards (pass it to :func:`moekit.parallel.expert_parallel`)."""
    if not dist.is_initialized():
        raise RuntimeError("parallel_mesh needs a process group: launch with torchrun and call "
                           "moekit.parallel.init_distributed first")
    world = dist.get_world_size()
    if expert_parallel < 1 or world % expert_parallel:
        raise ValueError(f"expert parallelism over {expert_parallel} processes, but the world has {world}: start a "
                         f"multiple of {expert_parallel} processes (the replicas of the expert shards)")
    return init_device_mesh(resolve_device(device).type, (world // expert_parallel, expert_parallel),
                            mesh_dim_names=("dp", "ep"))
