"""Token streams: batches are a function of the step."""

import pytest
import torch

from moekit.data import TaskStreams, TokenStream, train_tokenizer
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


def test_task_streams_draw_each_window_from_one_task_in_proportion_to_its_tokens(tmp_path):
    tok, _ = train_tokenizer(["abc def ghi jkl " * 50], 280, cache_dir=tmp_path)
    docs = [Document("abc def " * 60, "a", "en", "t"), Document("ghi jkl " * 20, "b", "fr", "t"),
            Document("abc def " * 60, "c", "en", "t")]
    ts = TaskStreams.from_documents(docs, tok, "language")
    assert ts.names == ["en", "fr"]
    x, y, task = ts.batch(3, 400, 8, seed=2)
    x2, _, task2 = ts.batch(3, 400, 8, seed=2)
    assert torch.equal(x, x2) and torch.equal(task, task2) and torch.equal(x[:, 1:], y[:, :-1])
    vocab = [set(ts.streams[i].ids.tolist()) for i in range(2)]
    for row, t in zip(x, task, strict=True):
        assert set(row.tolist()) <= vocab[int(t)]  # fr windows hold only fr tokens, and en only en
    sizes = [len(s) - 8 for s in ts.streams]
    p = sizes[1] / sum(sizes)
    n_fr = int((task == 1).sum())
    assert abs(n_fr - 400 * p) < 5 * (400 * p * (1 - p)) ** 0.5
    cx, cy, ct = ts.chunks(8, max_chunks=2)
    assert ct.tolist() == [0, 0, 1, 1] and torch.equal(cx[:, 1:], cy[:, :-1])
    assert set(cx[2].tolist()) <= vocab[1]
