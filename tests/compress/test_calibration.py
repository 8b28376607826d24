"""Calibration batches of one domain hold only that domain's training text."""

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from moekit.compress import domain_batches
from moekit.data import EOS, Document

WORDS = ["le", "chat", "the", "cat", "el", "gato", EOS]


def _tokenizer():
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token=EOS))
    tok.pre_tokenizer = Whitespace()
    return tok


DOCS = [Document("le chat " * 20, language="fr", topic="animals"),
        Document("the cat " * 20, language="en", topic="animals"),
        Document("el gato " * 20, language="es", topic="animals"),
        Document("el gato " * 10, language="fr", split="validation")]


def test_domain_batches_hold_only_the_chosen_domain():
    batches = domain_batches(DOCS, _tokenizer(), "language", "fr", seq_len=5, num_windows=6, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 5), (2, 5)]
    ids = {int(i) for b in batches for i in b.flatten()}
    assert ids <= {0, 1, 6} and {0, 1} <= ids  # le, chat (and the end-of-text token)
    with pytest.raises(ValueError, match=r"no train document has language='de'; found \['en', 'es', 'fr'\]"):
        domain_batches(DOCS, _tokenizer(), "language", "de", seq_len=5, num_windows=2)
    with pytest.raises(ValueError, match="field must be"):
        domain_batches(DOCS, _tokenizer(), "title", "x", seq_len=5, num_windows=2)
