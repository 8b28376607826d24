"""Expert and data parallelism on torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun:
:func:`init_distributed` joins the process group and :func:`parallel_mesh` arranges it as data x
expert parallel (:mod:`moekit.parallel.launch`); :func:`expert_parallel` shards a model's experts over
the ranks from outside the model (:mod:`moekit.parallel.expert_parallel`); :class:`AllToAllDispatcher`
moves the tokens (:mod:`moekit.parallel.dispatch`)."""

from moekit.parallel.dispatch import AllToAllDispatcher, all_to_all
from moekit.parallel.expert_parallel import (
    clip_grad_norm,
    exit_now,
    expert_groups,
    expert_parallel,
    full_state_dict,
    is_expert_parallel,
    sync_expert_gradients,
    sync_gradients,
)
from moekit.parallel.launch import DEVICES, device_name, init_distributed, parallel_mesh, resolve_device

__all__ = ["AllToAllDispatcher", "DEVICES", "all_to_all", "clip_grad_norm", "device_name", "exit_now",
           "expert_groups", "expert_parallel", "full_state_dict", "init_distributed", "is_expert_parallel",
           "parallel_mesh", "resolve_device", "sync_expert_gradients", "sync_gradients"]
