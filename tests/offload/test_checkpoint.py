"""moekit.offload.checkpoint: a saved GPT served with its experts on disk, never loaded; stale stores rebuilt,
stores of other models and corrupt blocks refused."""

import copy

import pytest
import torch

from moekit.models import GPT, GPTConfig
from moekit.offload import ExpertStore, load_offloaded, offload, write_store
from tests.offload.helpers import moe_gpt


def test_load_offloaded_never_loads_the_experts(tmp_path):
    model = moe_gpt()
    model.save(tmp_path / "model")
    prompt = torch.randint(0, 128, (1, 5))
    want = model.generate(prompt, 10)
    served, server = load_offloaded(tmp_path / "model", budget=0.5, prefetch="gate")
    assert (tmp_path / "model" / "experts" / "manifest.json").exists()  # written on first use
    assert not any(p.dim() == 3 for p in served.parameters())
    assert torch.equal(served.generate(prompt, 10), want)
    assert server.stats().bytes_read > 0
    server.close()
    again, _ = load_offloaded(tmp_path / "model", budget=0.25)  # the store is reused
    assert torch.equal(again.generate(prompt, 10), want)
    other = moe_gpt(num_experts=4)
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match="another model"):
        load_offloaded(tmp_path / "other", store=tmp_path / "model" / "experts")


def test_pregate_lookahead_while_generating(tmp_path):
    """Read-ME: the PreGate routes every layer before the backbone runs, so prefetching is exact."""
    torch.manual_seed(0)
    spec = {"kind": "moe", "num_experts": 4, "d_ff": 32, "router": "pregate", "router_args": {}, "shared_d_ff": 32}
    model = GPT(GPTConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=2, max_seq_len=64, d_ff=64, ffn=[spec] * 3,
                          pregate={"num_experts": 4, "d_model": 16, "n_heads": 2})).eval()
    model.save(tmp_path / "model")
    prompt = torch.randint(0, 128, (1, 6))
    want = model.generate(prompt, 12)
    served, server = load_offloaded(tmp_path / "model", budget=0.5, policy="belady", window=1, future="pregate",
                                    prefetch="future")
    assert torch.equal(served.generate(prompt, 12), want)
    s = server.stats()
    assert s.prefetch_precision == 1.0 and s.prefetched > 0
    forwards = 1 + 11  # the prompt, then each new token but the last
    assert server.future.length == forwards * 3  # every forward told the future its 3 layers' experts first
    assert s.misses <= 4 + forwards  # only layer 0 can miss: every later layer was prefetched while the one before ran
    server.close()
    with pytest.raises(ValueError, match="PreGate"):
        offload(moe_gpt(), write_store(moe_gpt(), tmp_path / "s"), future="pregate")
    with pytest.raises(ValueError, match="need context"):
        load_offloaded(tmp_path / "model", prefetch="gate")


def test_stale_or_failed_experts_are_never_served(tmp_path):
    # a PreGate model: the store records the PreGate too
    spec = {"kind": "moe", "num_experts": 4, "d_ff": 32, "router": "pregate", "router_args": {}}
    cfg = GPTConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, d_ff=64, ffn=[spec] * 2,
                    pregate={"num_experts": 4, "d_model": 16, "n_heads": 2})
    torch.manual_seed(0)
    a = GPT(cfg).eval()
    torch.manual_seed(1)
    b = GPT(cfg).eval()
    with pytest.raises(ValueError, match="another model"):
        write_store(a, tmp_path / "a").check_model(b)
    # experts trained on after the store was written
    model = moe_gpt()
    store = write_store(model, tmp_path / "s")
    with torch.no_grad():
        model.blocks[1].ffn.experts.down_proj[3].mul_(2)
    with pytest.raises(ValueError, match="layer 1 expert 3 differs"):
        offload(copy.deepcopy(model), store)
    # the store beside a checkpoint follows the checkpoint
    model.save(tmp_path / "m")
    load_offloaded(tmp_path / "m")
    with torch.no_grad():
        model.blocks[0].ffn.experts.gate_up_proj.mul_(0.5)
    model.save(tmp_path / "m")
    served, _ = load_offloaded(tmp_path / "m", budget=0.5)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.allclose(served(ids), model(ids), atol=1e-5)
    # a block that fails its checksum is never kept as resident, however often the caller retries
    write_store(model, tmp_path / "c")
    path = tmp_path / "c" / "layer_000.safetensors"
    data = bytearray(path.read_bytes())
    for off in ExpertStore(tmp_path / "c").offsets[0]:
        data[off + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    bad = copy.deepcopy(model)
    offload(bad, tmp_path / "c", budget=0.5)
    for _ in range(10):
        with pytest.raises(ValueError, match="checksum mismatch"):
            with torch.no_grad():
                bad(ids)
