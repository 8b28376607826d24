"""Conversion between dense models, moekit MoE models and other formats.

Dense -> MoE (one call returns a converted copy that still trains, saves and loads):
``partition`` (DSMoE: the FFN's hidden channels cut into experts, contiguous or clustered),
``refactor`` (Read-ME: per-domain channel masks, a residual expert and a pre-gating router),
``upcycle`` (copies of the FFN and a fresh router) and ``prune`` (the structured-pruning baseline),
for moekit's GPT and Hugging Face Llama, Mistral, Qwen2, Qwen3, GPT-2 and BERT models
(``register_family`` adds one). Each is a registered :class:`ConversionMethod`
(``register_method`` adds one; ``available_methods()`` lists them). ``save`` / ``load`` write and
read converted models: Hugging Face-native (Mixtral, Qwen2-MoE, Qwen3-MoE; ``export_hf`` writes
moekit's GPT as Llama / Mixtral too) when every layer maps exactly (``hf_native``,
``why_not_hf_native``), moekit's format otherwise; a converted model's ``save_pretrained`` does the
same.

Hugging Face sparse-MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): ``from_hf`` / ``to_hf`` /
``patch_hf_model`` / ``unpatch_hf_model``. ``attach_importance`` gives a converted BERT's dynamic-K
(DA-MoE) layers the importance of their attention ("received" or "paid"). transformers is imported
only by the caller's objects.
"""

from moekit.convert.build import ConvertedFFN, RoutingContext, bias_flags
from moekit.convert.calibration import (
    MIN_CALIBRATION_TOKENS,
    calibration_batches,
    calibration_batches_for,
    channel_importance,
    default_run,
)
from moekit.convert.export import TARGETS, Target, export_hf, hf_native, tokenizer_files, why_not_hf_native
from moekit.convert.ffn import DenseFFN, Family, FFNSite, find_ffns, register_family, supported_families
from moekit.convert.fit import fit_routers
from moekit.convert.groups import cluster_groups, contiguous_groups, valid_expert_counts
from moekit.convert.hf import from_hf, patch_hf_model, supported_blocks, to_hf, unpatch_hf_model
from moekit.convert.importance import (
    IMPORTANCE_SIGNALS,
    ImportanceHandle,
    attach_importance,
    attention_importance,
    valid_tokens,
)
from moekit.convert.measure import active_fraction
from moekit.convert.method import ConversionMethod, available_methods, method_class, register_method
from moekit.convert.partition import Partition, moe_from_ffn, partition, partition_ffn, partition_gpt
from moekit.convert.prune import Prune, prune
from moekit.convert.refactor import Refactor, attach_pregate, refactor, tune
from moekit.convert.saving import load, save
from moekit.convert.upcycle import Upcycle, upcycle

__all__ = ["from_hf", "to_hf", "patch_hf_model", "unpatch_hf_model", "supported_blocks", "partition_ffn",
           "moe_from_ffn", "partition", "upcycle", "prune", "contiguous_groups", "cluster_groups",
           "channel_importance", "active_fraction", "DenseFFN", "Family", "FFNSite", "find_ffns",
           "register_family", "supported_families", "ConvertedFFN", "RoutingContext", "fit_routers", "refactor",
           "tune", "attach_pregate", "save", "load", "ConversionMethod", "register_method", "available_methods",
           "method_class", "Partition", "Upcycle", "Prune", "Refactor", "partition_gpt", "valid_expert_counts",
           "MIN_CALIBRATION_TOKENS", "calibration_batches", "calibration_batches_for", "default_run", "bias_flags",
           "export_hf", "hf_native", "why_not_hf_native", "tokenizer_files", "TARGETS", "Target", "attach_importance",
           "attention_importance", "valid_tokens", "ImportanceHandle", "IMPORTANCE_SIGNALS"]
