"""moekit.offload.store: the expert store's layout, round trip, atomic rewrite and bad input."""

import os

import pytest
import torch

from moekit import MoE
from moekit.models import GPT
from moekit.offload import ExpertStore, offload, write_store
from tests.offload.helpers import CFG, moe_gpt


def test_store_roundtrip_and_layout(served):
    model, store = served
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(store.layers) == 3
    spec = store.layers[0]
    assert spec.numel == 2 * 32 * 32 + 32 * 32  # gate_up [2F, D] + down [D, F], F = 32
    buf = torch.empty(spec.numel)
    for li, moe in enumerate(moes):
        for e in range(8):
            parts = spec.split(store.read(li, e, buf))
            assert torch.equal(parts["first"], moe.experts.gate_up_proj[e])
            assert torch.equal(parts["down"], moe.experts.down_proj[e])
    assert store.bytes_read == 24 * spec.numel * 4
    assert store.total_bytes() == 24 * spec.numel * 4
    store.check_model(model)


def test_store_with_biases_and_plain_activation(tmp_path):
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, "topk", activation="gelu", bias=True)
    with torch.no_grad():
        for b in (moe.experts.up_proj_bias, moe.experts.down_proj_bias):
            b.normal_()
    store = write_store(moe, tmp_path / "s", dtype=torch.float16)
    parts = store.layers[0].split(store.read(0, 3, torch.empty(store.layers[0].numel, dtype=torch.float16)))
    assert torch.equal(parts["first_bias"], moe.experts.up_proj_bias[3].half())
    assert torch.equal(parts["down"], moe.experts.down_proj[3].half())
    assert store.dtype == torch.float16


def test_store_rewrite_is_atomic_and_replaces(tmp_path, served):
    model, store = served
    assert not (tmp_path / "store.tmp").exists()
    write_store(model, tmp_path / "store")
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_store_bad_input(tmp_path, served):
    model, store = served
    folder = store.folder
    other = moe_gpt(num_experts=8)
    with torch.no_grad():
        other.blocks[0].ffn.gate.weight.add_(1.0)
    with pytest.raises(ValueError, match="another model"):
        store.check_model(other)
    with pytest.raises(ValueError, match="another model"):
        offload(other, folder)
    with pytest.raises(ValueError, match="MoE layers"):
        ExpertStore(folder).check_model(GPT(CFG.with_moe(8, 2, every=2)))  # one MoE layer of three
    # corrupt: one flipped byte in an expert block
    path = folder / "layer_001.safetensors"
    data = bytearray(path.read_bytes())
    off = ExpertStore(folder).offsets[1][5]
    data[off + 7] ^= 0xFF
    path.write_bytes(bytes(data))
    s = ExpertStore(folder)
    with pytest.raises(ValueError, match="checksum mismatch"):
        s.read(1, 5, torch.empty(s.layers[1].numel))
    s.read(1, 4, torch.empty(s.layers[1].numel))  # the others are intact
    # truncated
    path.write_bytes(bytes(data[: len(data) - 100]))
    with pytest.raises(ValueError, match="truncated"):
        ExpertStore(folder)
    write_store(model, folder)
    (folder / "layer_002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"layer_002.safetensors: missing \(listed in moekit.json\)"):
        ExpertStore(folder)
    with pytest.raises(FileNotFoundError, match="not an expert store"):
        ExpertStore(tmp_path)
    with pytest.raises(ValueError, match="no moekit MoE layer"):
        write_store(GPT(CFG), tmp_path / "dense")
    with pytest.raises(ValueError, match="unsupported dtype"):
        write_store(model, tmp_path / "x", dtype=torch.int8)
