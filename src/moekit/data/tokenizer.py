"""Byte-level BPE tokenizers trained locally with Hugging Face ``tokenizers``, cached on disk.

The cache key is a hash of the training text and every setting, so a changed corpus or setting
trains a new tokenizer and an unchanged one is reloaded (``tokenizer.json``, no pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from moekit.io import MANIFEST, MoekitWarning, verify, verify_file, write_folder

EOS = "<|endoftext|>"
TOKENIZER_FORMAT = 2  # bump when the construction below or the cache entry changes (2: with moekit.json)
CACHE_KIND = "tokenizer-cache"


def cache_root() -> Path:
    return Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit"))


def tokenizer_key(texts: Sequence[str], vocab_size: int, min_frequency: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"vocab_size": vocab_size, "min_frequency": min_frequency, "format": TOKENIZER_FORMAT}).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:20]


def train_tokenizer(texts: Sequence[str], vocab_size: int = 8192, min_frequency: int = 2,
                    cache_dir: str | os.PathLike | None = None, show_progress: bool = False):
    """A byte-level BPE ``tokenizers.Tokenizer`` for ``texts``; returns ``(tokenizer, cache_hit)``.

    ``<|endoftext|>`` is token 0 and separates documents.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + {EOS} + one merge), got {vocab_size}")
    if not texts:
        raise ValueError("train_tokenizer: no training text")
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    folder = root / tokenizer_key(texts, vocab_size, min_frequency)
    if (folder / MANIFEST).exists():
        try:
            verify(folder, CACHE_KIND, "")
            return Tokenizer.from_file(str(folder / "tokenizer.json")), True
        except Exception as e:  # a cache: a damaged entry is trained again
            warnings.warn(f"tokenizer cache {folder}: {e}; training it again", MoekitWarning, stacklevel=2)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    try:
        with write_folder(folder, CACHE_KIND, "tokenizer cache", whole=True) as w:
            w.write_text("tokenizer.json", tok.to_str())
    except (OSError, ValueError) as e:  # a damaged entry or not ours: left as it is, the tokenizer is not cached
        warnings.warn(f"tokenizer cache: {e}", MoekitWarning, stacklevel=2)
    return tok, False


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (or a folder holding one). When the folder
    is moekit's (a run, a model), the file is checked against its checksum first."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(f"tokenizer: {p} does not exist")
    verify_file(p, "the tokenizer was damaged: copy it again from the run it came from, or retrain")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise ValueError(f"{p}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def eos_id(tokenizer) -> int:
    i = tokenizer.token_to_id(EOS)
    if i is None:
        raise ValueError(f"tokenizer has no {EOS} token; train it with moekit.data.train_tokenizer")
    return i
