"""MoLE — Mixture of Lookup Experts (Jie et al., ICML 2025).

- :mod:`.train`: the train form (:class:`MoLE`, the GPT's ``mole`` FFN kind): all experts active,
  each reading the token's raw embedding.
- :mod:`.format`: the lookup table on disk and its quantized records (int8, NF4).
- :mod:`.reparam`: :func:`reparameterize` writes a trained model's table and returns its inference form.
- :mod:`.lookup`: :class:`LookupTable` reads the rows of the tokens a batch needs.
- :mod:`.inference`: the inference form (:class:`MoLELookup`: no expert computed) and
  :func:`load_served` (from a checkpoint and its table, the experts never loaded).
"""

from moekit.models.mole.format import MANIFEST, NF4_LEVELS, TABLE, dequantize, quantize
from moekit.models.mole.inference import MoLELookup, load_served
from moekit.models.mole.lookup import LookupTable
from moekit.models.mole.reparam import reparameterize
from moekit.models.mole.train import MoLE

__all__ = ["MANIFEST", "NF4_LEVELS", "TABLE", "LookupTable", "MoLE", "MoLELookup", "dequantize", "load_served",
           "quantize", "reparameterize"]
