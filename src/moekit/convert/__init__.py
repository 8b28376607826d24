"""Conversion between moekit and other model formats.

``from_hf`` / ``to_hf`` / ``patch_hf_model`` / ``unpatch_hf_model``: Hugging Face sparse-MoE blocks
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE). transformers is imported only by the caller's objects.
``partition_ffn`` / ``moe_from_ffn``: DSMoE's cut of a dense FFN into expert blocks.
"""

from .hf import from_hf, patch_hf_model, supported_blocks, to_hf, unpatch_hf_model
from .partition import moe_from_ffn, partition_ffn

__all__ = ["from_hf", "to_hf", "patch_hf_model", "unpatch_hf_model", "supported_blocks", "partition_ffn",
           "moe_from_ffn"]
