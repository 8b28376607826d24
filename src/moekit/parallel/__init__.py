"""Expert parallelism on torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun:
:func:`expert_parallel` shards a model's experts over the ranks from outside the model
(:mod:`moekit.parallel.expert_parallel`); :class:`AllToAllDispatcher` moves the tokens
(:mod:`moekit.parallel.dispatch`)."""

from moekit.parallel.dispatch import AllToAllDispatcher, all_to_all
from moekit.parallel.expert_parallel import (
    clip_grad_norm,
    exit_now,
    expert_parallel,
    full_state_dict,
    is_expert_parallel,
    sync_gradients,
)

__all__ = ["AllToAllDispatcher", "all_to_all", "clip_grad_norm", "exit_now", "expert_parallel", "full_state_dict",
           "is_expert_parallel", "sync_gradients"]
