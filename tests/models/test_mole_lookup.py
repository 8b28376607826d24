"""moekit.models.mole.lookup: the table read back: bytes read, the RAM row cache, tables of other models,
truncated or missing, ids outside the vocabulary."""

import json

import numpy as np
import pytest
import torch

from moekit.models import GPT, GPTConfig
from moekit.models.mole import MANIFEST, TABLE, LookupTable, reparameterize
from tests.models.test_mole import _model


def test_bytes_read_per_new_token_is_exact(tmp_path):
    model = _model()
    inf = reparameterize(model, tmp_path / "t", progress=False).eval()
    table = inf.blocks[0].ffn.table
    ids = torch.tensor([[5, 7, 5, 9, 7]])  # 3 unique ids
    inf(ids)
    assert table.bytes_per_token == 2 * 4 * 32 * 2  # layers x experts x d_model x bytes
    assert table.bytes_read == 3 * table.bytes_per_token  # read once for all layers


def test_table_for_another_model_truncated_or_missing(tmp_path):
    model = _model()
    reparameterize(model, tmp_path / "t", progress=False)
    manifest = json.loads((tmp_path / "t" / MANIFEST).read_text())
    LookupTable(tmp_path / "t", expect_hash=manifest["source_sha256"])
    with pytest.raises(ValueError, match="built for other weights"):
        LookupTable(tmp_path / "t", expect_hash="0" * 64)
    data = (tmp_path / "t" / TABLE).read_bytes()
    (tmp_path / "t" / TABLE).write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"table.bin: 153,590 bytes, moekit.json records 153,600 \(truncated"):
        LookupTable(tmp_path / "t")
    (tmp_path / "t" / TABLE).unlink()
    with pytest.raises(ValueError, match="missing"):
        LookupTable(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        LookupTable(tmp_path / "nowhere")


def test_token_id_outside_vocabulary_and_bad_dtype(tmp_path):
    model = _model(layers=1)
    inf = reparameterize(model, tmp_path / "t", progress=False)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        inf.blocks[0].ffn.table.read(torch.tensor([3, 300]), 0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        reparameterize(model, tmp_path / "u", dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match="no MoLE layer"):
        reparameterize(GPT(GPTConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=8)), tmp_path / "v")
    assert np.dtype(inf.blocks[0].ffn.table.rows.dtype).itemsize == 2


def test_ram_row_cache_respects_its_budget(tmp_path):
    model = _model()
    reparameterize(model, tmp_path / "t", progress=False)
    plain = LookupTable(tmp_path / "t")
    n = plain.bytes_per_token
    table = LookupTable(tmp_path / "t", cache_bytes=2 * n + n // 2)  # room for 2 whole rows
    for ids, want_read in ([1, 2], 2), ([1], 0), ([3], 1), ([2], 1), ([1, 3], 1):
        before = table.bytes_read
        table._last = None  # a new forward
        rows = table.read(torch.tensor(ids), 1)
        plain._last = None
        torch.testing.assert_close(rows, plain.read(torch.tensor(ids), 1))
        assert table.bytes_read - before == want_read * n, ids
        assert table.cached_bytes <= 2 * n + n // 2
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        LookupTable(tmp_path / "t", cache_bytes=-1)
