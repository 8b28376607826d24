"""Token streams: batches are a function of the step."""

import pytest
import torch

from moekit.data import TokenStream, train_tokenizer
from moekit.data.corpus import Document


def test_token_stream_batches_are_a_function_of_the_step(tmp_path):
    tok, _ = train_tokenizer(["abc def ghi " * 50], 280, cache_dir=tmp_path)
    docs = [Document("abc def ghi " * 30, f"d{i}", "en", "t") for i in range(4)]
    s = TokenStream.from_documents(docs, tok)
    x1, y1 = s.batch(7, 4, 16, seed=1)
    x2, y2 = s.batch(7, 4, 16, seed=1)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(s.batch(8, 4, 16, seed=1)[0], x1)
    with pytest.raises(ValueError, match="too small for seq_len=100000"):
        s.check_fits(100_000, "training data")
    x, y, d = s.chunks(16, max_chunks=3)
    assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1]) and d.max() < 4
