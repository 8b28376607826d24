"""Models with a pluggable FFN slot (kinds registered in :mod:`moekit.models.ffn`)."""

from moekit.models import mole  # noqa: F401  (registers the "mole" FFN kind)
from moekit.models.ffn import available_ffns, register_ffn
from moekit.models.gpt import GPT, GPTConfig
from moekit.models.meo import MEO
from moekit.models.pregate import PreGate

__all__ = ["GPT", "GPTConfig", "MEO", "PreGate", "available_ffns", "register_ffn"]
