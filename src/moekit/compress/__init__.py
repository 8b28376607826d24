"""Expert compression: merging, pruning and mixed precision of a trained MoE's experts. Each method
is one file registered with :func:`register_compression` (contract: :class:`CompressionMethod`).

Registered: ``prune-random``, ``prune-count``, ``prune-soft``, ``reap`` (:mod:`.prune`), ``naee``,
``easy-ep``, ``hc-smoe``, ``merge-uniform``, ``merge-random`` (:mod:`.hcsmoe`), ``seer``, and
``mc-moe`` (:mod:`.mcmoe`: PMQ's per-expert bit widths, packed by :mod:`.quant` with round-to-nearest
or GPTQ (:mod:`.gptq`), attention optionally at 4 bits; ODP's dynamic pruning of a token's second
expert is the ``odp`` router)."""

from moekit.compress.calibration import domain_batches
from moekit.compress.easyep import EasyEP
from moekit.compress.gptq import gptq, hessian
from moekit.compress.hcsmoe import HCSMoE, MergeRandom, MergeUniform, cluster, frequency_coeffs
from moekit.compress.mcmoe import (
    MCMoE,
    calibrate_odp,
    load_compressed,
    mcmoe,
    quantize_attention,
    save_compressed,
    with_odp,
)
from moekit.compress.method import (
    CompressionMethod,
    available_compressions,
    build_compression,
    compress,
    register_compression,
)
from moekit.compress.naee import Naee
from moekit.compress.prune import PruneCount, PruneRandom, PruneSoft, Reap, ScorePruning
from moekit.compress.quant import dequantize, quantize, quantized_bytes
from moekit.compress.quantized import QuantizedExperts, QuantizedLinear
from moekit.compress.seer import Seer, router_entropy, seer_finetune, set_top_k
from moekit.compress.stats import ExpertStats, expert_outputs, gather_stats
from moekit.compress.surgery import dedup_bytes, merge_layer, prune_layer, sync_config

__all__ = ["CompressionMethod", "EasyEP", "ExpertStats", "HCSMoE", "MCMoE", "MergeRandom", "MergeUniform", "Naee",
           "QuantizedExperts", "QuantizedLinear", "calibrate_odp", "dequantize", "gptq", "hessian", "load_compressed",
           "mcmoe", "quantize", "quantize_attention", "quantized_bytes", "save_compressed", "with_odp",
           "PruneCount", "PruneRandom", "PruneSoft", "Reap", "ScorePruning", "Seer", "available_compressions",
           "build_compression", "cluster", "compress", "dedup_bytes", "domain_batches", "expert_outputs",
           "frequency_coeffs", "gather_stats", "merge_layer", "prune_layer", "register_compression",
           "router_entropy", "seer_finetune", "set_top_k", "sync_config"]
