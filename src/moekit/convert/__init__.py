"""Conversion between moekit and other model formats.

``from_hf`` / ``to_hf`` / ``patch_hf_model`` / ``unpatch_hf_model``: Hugging Face sparse-MoE blocks
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE). transformers is imported only by the caller's objects.
"""

from .hf import from_hf, patch_hf_model, supported_blocks, to_hf, unpatch_hf_model

__all__ = ["from_hf", "to_hf", "patch_hf_model", "unpatch_hf_model", "supported_blocks"]
