"""Conversion between dense models, moekit MoE models and other formats.

Dense -> MoE (one call returns a converted copy that still trains, saves and loads):
``partition`` (DSMoE: the FFN's hidden channels cut into experts, contiguous or clustered),
``refactor`` (Read-ME: per-domain channel masks, a residual expert and a pre-gating router),
``upcycle`` (copies of the FFN and a fresh router) and ``prune`` (the structured-pruning baseline),
for moekit's GPT and Hugging Face Llama, Mistral, Qwen2, Qwen3, GPT-2 and BERT models
(``register_family`` adds one). ``save`` / ``load`` write and read converted models.

Hugging Face sparse-MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): ``from_hf`` / ``to_hf`` /
``patch_hf_model`` / ``unpatch_hf_model``. transformers is imported only by the caller's objects.
"""

from moekit.convert.build import ConvertedFFN, RoutingContext
from moekit.convert.ffn import DenseFFN, Family, FFNSite, find_ffns, register_family, supported_families
from moekit.convert.fit import fit_routers
from moekit.convert.hf import from_hf, patch_hf_model, supported_blocks, to_hf, unpatch_hf_model
from moekit.convert.partition import (
    active_fraction,
    channel_importance,
    cluster_groups,
    contiguous_groups,
    moe_from_ffn,
    partition,
    partition_ffn,
    prune,
    upcycle,
)
from moekit.convert.refactor import attach_pregate, refactor, tune
from moekit.convert.saving import load, save

__all__ = ["from_hf", "to_hf", "patch_hf_model", "unpatch_hf_model", "supported_blocks", "partition_ffn",
           "moe_from_ffn", "partition", "upcycle", "prune", "contiguous_groups", "cluster_groups",
           "channel_importance", "active_fraction", "DenseFFN", "Family", "FFNSite", "find_ffns",
           "register_family", "supported_families", "ConvertedFFN", "RoutingContext", "fit_routers", "refactor",
           "tune", "attach_pregate", "save", "load"]
