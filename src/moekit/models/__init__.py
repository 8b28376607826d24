"""Models with a pluggable FFN slot."""

from moekit.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
