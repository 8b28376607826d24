"""Compressed MoEs served through moekit.offload: experts quantized at widths of their own (MC-MoE) stored
as they are (blocks of their real sizes, checked against quantize's own bytes), served with outputs equal
to the in-memory QuantizedExperts model's under every policy and the simulator's counters, within budgets
counted in real bytes; pruned and merged layers; damaged blocks and other allocations refused; a saved
MC-MoE GPT served from its checkpoint."""

import copy
import json

import pytest
import torch

from moekit import MoE
from moekit.compress.mcmoe import save_compressed, with_odp
from moekit.compress.quant import dequantize, quantize, quantized_bytes
from moekit.compress.quantized import QuantizedExperts
from moekit.compress.surgery import merge_layer, prune_layer
from moekit.offload import (
    ExpertStore,
    Future,
    available_policies,
    load_offloaded,
    offload,
    record_trace,
    simulate,
    write_store,
)
from moekit.offload import store as store_module
from moekit.offload.cache import plan_pools
from tests.faults import resign
from tests.offload.helpers import biased_moe, decode, moe_gpt

GROUP = 16
BITS = [[1, 2, 3, 4, 8, 1, 2, 3], [2, 2, 2, 2, 4, 4, 4, 4], [8, 1, 1, 1, 1, 1, 1, 2]]


def _quantized(model, bits=BITS):
    """``model`` with every MoE layer's experts quantized at ``bits[layer]`` (in place); the float
    experts before quantization, per layer."""
    floats = []
    for moe, b in zip([m for m in model.modules() if isinstance(m, MoE)], bits):
        floats.append(copy.deepcopy(moe.experts))
        moe.experts = QuantizedExperts.from_experts(moe.experts, b, GROUP)
    return model, floats


@pytest.fixture
def qserved(tmp_path):
    model, floats = _quantized(moe_gpt())
    return model, write_store(model, tmp_path / "store"), floats


def _block_bytes(bits, d=32, f=32):
    """quantize's own bytes of an expert (gate_up [2F, D], down [D, F]) at ``bits``."""
    return quantized_bytes((2 * f, d), bits, GROUP) + quantized_bytes((d, f), bits, GROUP)


def test_quantized_blocks_are_stored_as_quantized(qserved):
    model, store, floats = qserved
    m = json.loads((store.folder / "manifest.json").read_text())
    assert m["version"] == 2 and [d["bits"] for d in m["layers"]] == BITS and m["layers"][0]["group"] == GROUP
    assert store.sizes == [[_block_bytes(b) for b in layer] for layer in BITS]
    assert store.total_bytes() == sum(_block_bytes(b) for layer in BITS for b in layer)
    for li, layer in enumerate(BITS):
        for e, b in enumerate(layer):
            buf = torch.empty(store.sizes[li][e], dtype=torch.uint8)
            parts = store.layers[li].split_quant(e, store.read(li, e, buf))
            for name, w in (("first", floats[li].first_proj[e]), ("down", floats[li].down_proj[e])):
                want = quantize(w, b, GROUP)  # from the float weights: no dequantize-requantize on the way
                assert parts[name].bits == b and torch.equal(parts[name].codes, want.codes)
                assert torch.equal(dequantize(parts[name]), dequantize(want))
    store.check_model(model)


@pytest.mark.parametrize("policy,partition", [(p, part) for p in available_policies() for part in ("layer", "global")])
def test_served_quantized_model_is_exact_and_matches_the_simulator(qserved, policy, partition):
    model, store, _ = qserved
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 16))
    trace = record_trace(ref, ids)
    server = offload(model, store, budget=0.3, policy=policy, partition=partition, future=Future(trace.accesses()))
    with torch.no_grad():
        assert (decode(model, ids) - ref(ids)).abs().max() <= 1e-5
    s = server.stats()
    for layer, sizes in enumerate(store.sizes):  # every slot is of its experts' real (packed) size
        for e, n in enumerate(sizes):
            slab = server.slabs[server.cache.pool(layer, e)]
            assert slab.shape[1] == -(-n // 8) * 8 and slab.dtype == torch.uint8
    assert s.resident_bytes <= server.budget_bytes == int(0.3 * store.total_bytes())
    assert s.bytes_read == s.bytes_loaded and s.misses > 0 and s.hits > 0
    sim = simulate(trace.accesses(), server.expert_bytes, trace.num_experts, server.budget_bytes, policy, partition)
    assert (s.hits, s.misses, s.direct, s.bytes_loaded) == (sim.hits, sim.misses, sim.direct, sim.bytes_loaded)


def test_a_budget_that_holds_only_the_small_experts(qserved):
    model, store, _ = qserved
    ref = copy.deepcopy(model)
    small, large = _block_bytes(1), _block_bytes(8)
    budget = 4 * small + large  # room for a few of the smallest experts, and one buffer for the rest
    plan = plan_pools(budget, store.sizes, "layer")
    held = {store.sizes[li][e] for li in range(3) for e in range(8) if plan.slots[plan.pool_of[li][e]]}
    assert held == {small, _block_bytes(2)} and plan.scratch == large  # the smallest first; nothing of 3+ bits
    fp32 = 3 * 32 * 32 * 4  # one float expert
    assert budget < fp32  # at fp32 sizes this budget holds not a single expert
    server = offload(model, store, budget=budget, policy="lru")
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert (decode(model, ids) - ref(ids)).abs().max() <= 1e-5
    s = server.stats()
    assert s.direct > 0 and s.hits > 0 and s.resident_bytes <= budget
    assert s.bytes_read == s.bytes_loaded
    with pytest.raises(ValueError, match="holds no expert"):
        offload(copy.deepcopy(ref), store, budget=small)


@pytest.mark.parametrize("direct,host,prefetch", [(2, "disk", None), ("future", "disk", None), (None, "ram", None),
                                                  (None, "disk", "future")])
def test_quantized_experts_computed_from_the_store_or_host_ram_or_prefetched(qserved, direct, host, prefetch):
    model, store, _ = qserved
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 16))
    trace = record_trace(ref, ids)
    server = offload(model, store, budget=0.7, future=Future(trace.accesses(), trace.token.tolist()), direct=direct,
                     host=host, prefetch=prefetch, policy="belady")
    with torch.no_grad():
        assert (decode(model, ids) - ref(ids)).abs().max() <= 1e-5
    s = server.stats()
    assert s.resident_bytes <= server.budget_bytes
    assert (s.direct > 0) == (direct is not None)
    assert s.bytes_read == (0 if host == "ram" else s.bytes_loaded)
    assert (s.prefetched > 0 and s.prefetch_precision == 1.0) if prefetch else s.prefetched == 0
    with pytest.raises(ValueError, match="quantized"):
        offload(copy.deepcopy(ref), store, direct="cost", host="ram")


def test_pruned_and_merged_models_serve_exactly(tmp_path):
    model = moe_gpt()
    moes = [b.ffn for b in model.blocks]
    model.blocks[0].ffn = prune_layer(moes[0], [0, 2, 3, 5, 7])  # 5 experts
    model.blocks[1].ffn = merge_layer(moes[1], [0, 0, 1, 1, 2, 2, 3, 3], [0.5] * 8)  # 4 merged, grouped router
    model.eval()
    quantized = copy.deepcopy(model)
    quantized.blocks[2].ffn.experts = QuantizedExperts.from_experts(moes[2].experts, [1, 2, 3, 4, 8, 2, 2, 2], GROUP)
    ids = torch.randint(0, 128, (1, 12))
    for name, m in (("pruned_merged", model), ("and_quantized", quantized)):
        store = write_store(m, tmp_path / name)
        assert [s.num_experts for s in store.layers] == [5, 4, 8]
        for policy in available_policies(online=True):
            served, ref = copy.deepcopy(m), copy.deepcopy(m)
            server = offload(served, store, budget=0.4, policy=policy)
            with torch.no_grad():
                assert (decode(served, ids) - ref(ids)).abs().max() <= 1e-5
            assert server.stats().resident_bytes <= server.budget_bytes


def test_damaged_quantized_block_and_another_allocation_are_refused(qserved):
    model, store, _ = qserved
    other, _ = _quantized(moe_gpt(), [BITS[0], BITS[2], BITS[1]])  # same weights, other widths
    with pytest.raises(ValueError, match="another model"):
        store.check_model(other)
    with pytest.raises(ValueError, match="another model"):
        offload(other, store)
    changed = copy.deepcopy(model)
    changed.blocks[1].ffn.experts.experts[6].down_codes[3] ^= 0xFF
    with pytest.raises(ValueError, match="layer 1 expert 6 differs"):
        store.check_model(changed)
    path = store.folder / "layer_001.safetensors"
    data = bytearray(path.read_bytes())
    data[store.offsets[1][6] + store.sizes[1][6] - 2] ^= 0xFF  # in the packed codes
    path.write_bytes(bytes(data))
    s = ExpertStore(store.folder)
    with pytest.raises(ValueError, match=r"layer_001.safetensors: layer 1 expert 6: checksum mismatch"):
        s.read(1, 6, torch.empty(s.sizes[1][6], dtype=torch.uint8))
    s.read(1, 5, torch.empty(s.sizes[1][5], dtype=torch.uint8))  # the others are intact
    with pytest.raises(ValueError, match="uint8"):
        s.read(1, 5, torch.empty(s.sizes[1][5]))
    with pytest.raises(ValueError, match="already"):
        write_store(model, store.folder.parent / "low", low_bit=True)
    with pytest.raises(ValueError, match="quantized"):
        next(s.stream(1, 5, torch.empty(64)))
    m = json.loads((store.folder / "manifest.json").read_text())
    m["layers"][2]["bits"][0] = 4  # a hand-edited manifest, re-signed: the widths no longer fit the blocks
    (store.folder / "manifest.json").write_text(json.dumps(m))
    resign(store.folder)
    with pytest.raises(ValueError, match="layer_002.safetensors's block sizes"):
        ExpertStore(store.folder)
    ref = copy.deepcopy(model)
    offload(ref, s, budget=1.0)
    with pytest.raises(ValueError, match="layer_001.safetensors"), torch.no_grad():
        for _ in range(4):  # until a token is routed to expert 6 of layer 1
            ref(torch.arange(128).reshape(4, 32))


def test_a_version_1_store_is_still_read(tmp_path, monkeypatch):
    model = moe_gpt()
    ref = copy.deepcopy(model)
    monkeypatch.setattr(store_module, "VERSION", 1)
    store = write_store(model, tmp_path / "v1")
    monkeypatch.undo()
    assert json.loads((store.folder / "manifest.json").read_text())["version"] == 1
    server = offload(model, ExpertStore(store.folder), budget=0.25)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert (model(ids) - ref(ids)).abs().max() <= 1e-5
    assert server.stats().bytes_read > 0


def test_load_offloaded_serves_a_saved_mcmoe_gpt(tmp_path):
    model, _ = _quantized(moe_gpt())
    with_odp(model)
    for b in model.blocks:
        b.ffn.gate.mu.fill_(0.3)
    model.eval()
    save_compressed(model, tmp_path / "m")
    prompt = torch.randint(0, 128, (1, 5))
    want = model.generate(prompt, 8)
    served, server = load_offloaded(tmp_path / "m", budget=0.3)
    assert server.store.quantized and [s.bits for s in server.store.layers] == [tuple(b) for b in BITS]
    assert torch.equal(served.generate(prompt, 8), want)
    assert server.stats().bytes_read > 0
    server.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("host", ["disk", "ram"])
def test_quantized_experts_cached_on_a_gpu(qserved, host):
    model, store, _ = qserved
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 16))
    server = offload(model.cuda(), store, budget=0.5, host=host, device="cuda", direct=2)
    with torch.no_grad():
        assert (decode(model, ids.cuda()).cpu() - ref(ids)).abs().max() <= 1e-4
    s = server.stats()
    assert s.direct > 0 and s.hits > 0 and s.resident_bytes <= server.budget_bytes
    assert all(sl.device.type == "cuda" and sl.dtype == torch.uint8 for sl in server.slabs)


def test_quantized_experts_with_biases_and_a_plain_activation(tmp_path):
    moe = biased_moe(32)
    moe.experts = QuantizedExperts.from_experts(moe.experts, [1, 2, 3, 8], GROUP)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        want = moe(x)
    store = write_store(moe, tmp_path / "s")
    assert store.sizes[0] == [quantized_bytes((32, 16), b, GROUP) + quantized_bytes((16, 32), b, GROUP) + (32 + 16) * 4
                              for b in (1, 2, 3, 8)]  # codes, scales, zeros and the fp32 biases
    for direct in (None, 2):
        m = copy.deepcopy(moe)
        server = offload(m, store, budget=0.6, direct=direct)
        with torch.no_grad():
            assert (m(x) - want).abs().max() <= 1e-5
        assert server.stats().misses > 0
