"""Models with a pluggable FFN slot."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
