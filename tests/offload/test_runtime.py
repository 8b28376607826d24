"""moekit.offload.runtime: served outputs equal the in-memory model's and the served counters equal the
simulator's, for every registered policy, prefetching, mixed precision, experts computed from the store or
held in host RAM; bad input."""

import copy
import math

import pytest
import torch

from moekit.offload import ExpertStore, Future, available_policies, offload, record_trace, simulate, write_store
from tests.offload.helpers import biased_moe, decode, moe_gpt, traced


@pytest.mark.parametrize("policy,partition", [(p, ("layer", "global")[i % 2]) for i, p in enumerate(available_policies())])
@pytest.mark.parametrize("budget", [0.125, 0.5])
def test_served_decode_is_exact_and_matches_the_simulator(served, policy, partition, budget):
    model, store = served
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 24))
    trace = record_trace(ref, ids)
    future = None if policy in available_policies(online=True) else Future(trace.accesses())  # only for lookahead
    server = offload(model, store, budget=budget, policy=policy, partition=partition, future=future)
    assert not any(isinstance(p, torch.nn.Parameter) and p.dim() == 3 for p in model.parameters())
    with torch.no_grad():
        assert (decode(model, ids) - ref(ids)).abs().max() <= 1e-5
    s = server.stats()
    sim = simulate(trace.accesses(), server.expert_bytes, trace.num_experts, server.budget_bytes, policy, partition)
    assert (s.hits, s.misses, s.bytes_loaded) == (sim.hits, sim.misses, sim.bytes_loaded)
    assert s.bytes_read == s.bytes_loaded and s.tokens == 24
    assert s.resident_bytes <= server.budget_bytes


def test_served_generate_greedy_identical(served):
    model, store = served
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, 128, (1, 6))
    want = ref.generate(prompt, 12)
    offload(model, store, budget=0.25)
    assert torch.equal(model.generate(prompt, 12), want)


def test_one_slot_per_layer_serves_top2(served):
    model, store = served
    ref = copy.deepcopy(model)
    server = offload(model, store, budget=3 * store.expert_bytes(0))  # one expert per layer, k = 2
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.allclose(model(ids), ref(ids), atol=1e-5)
    assert server.resident_bytes() == 3 * store.expert_bytes(0)


@pytest.mark.parametrize("policy,direct", [("belady", "future"), ("lru", 2)])
def test_served_from_the_store_is_exact_and_matches_the_simulator(served, policy, direct):
    model, store, ref, ids, trace, acc, tokens = traced(served, 24)
    server = offload(model, store, budget=0.25, policy=policy, window=8, future=Future(acc, tokens), direct=direct)
    with torch.no_grad():
        assert (decode(model, ids) - ref(ids)).abs().max() <= 1e-5
    s = server.stats()
    sim = simulate(acc, server.expert_bytes, trace.num_experts, server.budget_bytes, policy, "layer", 8, tokens,
                   direct=direct)
    assert (s.hits, s.misses, s.direct, s.bytes_loaded) == (sim.hits, sim.misses, sim.direct, sim.bytes_loaded)
    assert s.direct > 0 and s.bytes_read == s.bytes_loaded and s.read_s > 0
    assert s.resident_bytes <= server.budget_bytes
    assert server.stream_buf.numel() * 4 <= 16 << 10  # the streaming buffer is a few rows, not an expert


def test_from_the_store_with_biases_fp16_and_a_corrupt_block(tmp_path):
    moe = biased_moe(24)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        want = moe(x)
    for dtype in (torch.float32, torch.float16):
        store = write_store(moe, tmp_path / str(dtype), dtype=dtype)
        spec = store.layers[0]
        # the streamed parts are the block's, chunk by chunk, in compute order
        buf = torch.empty(40, dtype=dtype)  # two rows of the first projection, one of down at a time
        got = {"first": [], "bias": [], "down": []}
        for part, _, w in store.stream(0, 2, buf):
            got[part].append(w.clone())
        whole = spec.split(store.read(0, 2, torch.empty(spec.numel, dtype=dtype)))
        assert torch.equal(torch.cat(got["first"]), whole["first"]) and len(got["first"]) == 12
        assert torch.equal(torch.cat(got["down"]), whole["down"]) and len(got["down"]) == 16
        assert torch.equal(got["bias"][0], torch.cat([whole["first_bias"], whole["down_bias"]]))
        m = copy.deepcopy(moe)
        server = offload(m, store, budget=spec.numel * dtype.itemsize, direct=100)  # one slot: the rest streamed
        with torch.no_grad():
            out = m(x)
        if dtype == torch.float32:
            assert torch.allclose(out, want, atol=1e-6)
        else:  # the fp16 store: every path reads the same fp16 weights
            ref = copy.deepcopy(moe)
            offload(ref, store, budget=1.0)
            with torch.no_grad():
                assert torch.allclose(out, ref(x), atol=1e-6)
        assert server.stats().direct > 0
    # a corrupt block raises before anything computed from it is returned
    path = store.folder / "layer_000.safetensors"
    data = bytearray(path.read_bytes())
    data[store.offsets[0][2] + spec.numel * 2 - 3] ^= 0xFF  # in the biases: read out of order, checksummed last
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        for _ in ExpertStore(store.folder).stream(0, 2, buf):
            pass
    with pytest.raises(ValueError, match="one row"):
        next(ExpertStore(store.folder).stream(0, 1, torch.empty(4, dtype=torch.float16)))


@pytest.mark.parametrize("direct", [None, "cost", 2])
def test_experts_held_in_host_ram(served, direct):
    """host='ram': every expert read once into host memory, the cache filled from there (the
    mixtral-offloading / Fiddler setting); exact, and the counters are the simulator's."""
    model, store, ref, ids, trace, acc, tokens = traced(served, 24)
    server = offload(model, store, budget=0.25, host="ram", direct=direct)
    assert server.device == torch.device("cpu")  # the model's
    assert server.read_s == server.exposed_s == 0 and not server.cache.where  # calibration leaves no trace
    with torch.no_grad():
        assert (decode(model, ids) - ref(ids)).abs().max() <= 1e-5
    s = server.stats()
    assert s.bytes_read == 0  # nothing read from disk while serving
    k = server.cache.direct
    sim = simulate(acc, server.expert_bytes, trace.num_experts, server.budget_bytes, "lru", tokens=tokens, direct=k)
    assert (s.hits, s.misses, s.direct, s.bytes_loaded) == (sim.hits, sim.misses, sim.direct, sim.bytes_loaded)
    if direct == "cost":
        c = server.costs
        assert c["device"] == "cpu" and c["host"] == "ram" and len(c["threshold"]) == 3 and k == c["threshold"]
        layer = c["layers"][0]
        assert layer["t_load"] > 0 and len(layer["t_cache"]) == len(layer["t_host"]) == len(layer["tokens"])
        assert all(t >= 1 for t in c["threshold"])
        with pytest.raises(RuntimeError, match="before serving"):
            server.calibrate()  # it would overwrite a slot the cache uses
    server.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("host", ["disk", "ram"])
def test_gpu_cache_with_cpu_compute_fallback(served, host):
    model, store, ref, ids, trace, acc, tokens = traced(served, 24)
    server = offload(model.cuda(), store, budget=0.25, host=host, direct="cost", device="cuda")
    with torch.no_grad():
        assert (decode(model, ids.cuda()).cpu() - ref(ids)).abs().max() <= 1e-4
    s = server.stats()
    sim = simulate(acc, server.expert_bytes, trace.num_experts, server.budget_bytes, "lru", tokens=tokens,
                   direct=server.cache.direct)
    assert (s.hits, s.misses, s.direct) == (sim.hits, sim.misses, sim.direct)
    assert all(sl.device.type == "cuda" for sl in server.slabs)


def test_offload_bad_input(served):
    model, store = served
    with pytest.raises(ValueError, match="minimum is"):
        offload(copy.deepcopy(model), store, budget=store.expert_bytes(0))  # one expert for three layers
    with pytest.raises(ValueError, match="budget must be > 0"):
        offload(copy.deepcopy(model), store, budget=0)
    with pytest.raises(ValueError, match="direct"):
        offload(copy.deepcopy(model), store, direct="sometimes")
    with pytest.raises(ValueError, match="needs the future"):
        offload(copy.deepcopy(model), store, direct="future")
    with pytest.raises(ValueError, match="same bytes on the same cores"):
        offload(copy.deepcopy(model), store, direct="cost")  # one device, experts on disk: nothing to weigh
    with pytest.raises(ValueError, match="one per layer"):
        offload(copy.deepcopy(model), store, direct=[2, 2])  # three layers
    with pytest.raises(ValueError, match="host"):
        offload(copy.deepcopy(model), store, host="ssd")
    m = copy.deepcopy(model)
    offload(m, store, device="meta")
    with pytest.raises(RuntimeError, match="expert cache is on meta"), torch.no_grad():
        m(torch.randint(0, 128, (1, 4)))
    m = copy.deepcopy(model)
    offload(m, store)
    with pytest.raises(RuntimeError, match="inference only"):
        m(torch.randint(0, 128, (1, 4))).sum().backward()


@pytest.mark.parametrize("window", [1, math.inf])
@pytest.mark.parametrize("partition", ["layer", "global"])
def test_exact_prefetch_matches_the_simulator(served, window, partition):
    model, store, ref, ids, trace, acc, tokens = traced(served, 20)
    server = offload(model, store, budget=0.5, policy="belady", partition=partition, window=window,
                     future=Future(acc, tokens), prefetch="future")
    with torch.no_grad():
        assert (decode(model, ids) - ref(ids)).abs().max() <= 1e-5
    s = server.stats()
    sim = simulate(acc, server.expert_bytes, trace.num_experts, server.budget_bytes, "belady", partition, window,
                   tokens, prefetch=True)
    assert (s.hits, s.misses, s.prefetched, s.bytes_loaded) == (sim.hits, sim.misses, sim.prefetched, sim.bytes_loaded)
    assert s.prefetched > 0 and s.bytes_read == s.bytes_loaded
    assert s.prefetch_precision == 1.0  # the future is exact: every prefetched expert is used
    if partition == "layer":
        # within a token every layer but the first is known ahead; across tokens, every layer
        assert s.misses <= (trace.num_tokens if window == 1 else 0) * 2 + 2
    server.close()


def test_gate_prefetch_is_exact_and_counted(served):
    model, store = served
    ref = copy.deepcopy(model)
    server = offload(model, store, budget=0.25, policy="lru", prefetch="gate")
    ids = torch.randint(0, 128, (1, 16))
    assert torch.equal(model.generate(ids[:, :4], 12), ref.generate(ids[:, :4], 12))
    s = server.stats()
    assert s.prefetched > 0 and s.bytes_read == s.bytes_loaded
    assert 0 <= s.prefetch_precision <= 1 and 0 <= s.prefetch_recall <= 1
    assert s.exposed_s >= 0 and s.read_s > 0
    server.close()
    with pytest.raises(ValueError, match="prefetch"):
        offload(copy.deepcopy(ref), store, prefetch="next")
    with pytest.raises(ValueError, match="needs future"):
        offload(copy.deepcopy(ref), store, prefetch="future")


def test_low_bit_copies_and_mixed_precision_serving(tmp_path):
    model = moe_gpt()
    ref = copy.deepcopy(model)
    store = write_store(model, tmp_path / "store", low_bit=True)
    spec = store.layers[0]
    assert spec.low_bytes < spec.numel * 4 / 3.5  # about a quarter of fp32, plus the scales
    p = store.read_low(0, 3, torch.empty(spec.low_bytes, dtype=torch.uint8))
    w = model.blocks[0].ffn.experts.gate_up_proj[3]
    deq = p["first"].float() * p["first_scale"][:, None]
    assert (deq - w).abs().max() <= w.abs().amax(1).max() / 127 * 0.51
    ids = torch.randint(0, 128, (1, 24))
    trace = record_trace(ref, ids)
    budget = int(0.5 * store.total_bytes())
    server = offload(model, store, budget=budget, policy="lru", low_threshold=0.49)
    logits = decode(model, ids)
    with torch.no_grad():
        want = ref(ids)
    diff = (logits - want).abs().max()
    assert 0 < diff < 0.05  # the int8 copies change the output a little
    s = server.stats()
    sim = simulate(trace.accesses(), server.expert_bytes, trace.num_experts, budget, "lru",
                   low_bytes=[x.low_bytes for x in store.layers], weights=trace.gate_weights(), low_threshold=0.49)
    assert s.low_bit > 0 and (s.hits, s.misses, s.low_bit, s.bytes_loaded) == (sim.hits, sim.misses, sim.low_bit,
                                                                                sim.bytes_loaded)
    assert s.bytes_read == s.bytes_loaded and s.resident_bytes <= budget
    with pytest.raises(ValueError, match="int8 copies"):
        offload(copy.deepcopy(ref), write_store(ref, tmp_path / "plain"), low_threshold=0.3)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_hugging_face_moe_served_from_disk(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    from moekit.convert import patch_hf_model

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=128, num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(moe_intermediate_size=64, shared_expert_intermediate_size=128, num_experts=8,
                                          num_experts_per_tok=2, intermediate_size=128, **common)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        cfg = transformers.OlmoeConfig(intermediate_size=64, num_experts=16, num_experts_per_tok=4, **common)
        cls = transformers.OlmoeForCausalLM
    torch.manual_seed(0)
    hf = patch_hf_model(cls(cfg)).eval()
    ref = copy.deepcopy(hf)
    ids = torch.randint(0, 256, (1, 12))
    store = write_store(hf, tmp_path / "store")
    server = offload(hf, store, budget=0.5, policy="lfu")
    with torch.no_grad():
        got, want = hf(ids).logits, ref(ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert server.stats().bytes_read > 0 and server.resident_bytes() <= server.budget_bytes
