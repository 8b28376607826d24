"""moekit.offload: store, traces, the cache's invariants, the simulator against the runtime, exactness, bad input."""

import copy
import math
import os

import pytest
import torch

from moekit import MoE
from moekit.models import GPT, GPTConfig
from moekit.offload import (
    ExpertStore,
    Future,
    Trace,
    load_offloaded,
    offload,
    record_trace,
    simulate,
    write_store,
)

CFG = GPTConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=2, max_seq_len=64, d_ff=64)


def _moe_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(CFG.with_moe(num_experts=kw.pop("num_experts", 8), k=kw.pop("k", 2), **kw)).eval()


def _decode(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` decoded token by token (batch-1 decoding's access stream)."""
    caches = [{} for _ in model.blocks]
    with torch.no_grad():
        return torch.cat([model(ids[:, t: t + 1], caches) for t in range(ids.shape[1])], 1)


def _traced(served, tokens: int):
    """``(model, store, reference copy, ids, accesses, token of each access)`` for ``tokens`` random ids."""
    model, store = served
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, tokens))
    trace = record_trace(ref, ids)
    return model, store, ref, ids, trace, trace.accesses(), trace.token.tolist()


@pytest.fixture
def served(tmp_path):
    model = _moe_gpt()
    store = write_store(model, tmp_path / "store")
    return model, store


# ----------------------------------------------------------------------------------- store


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
    other = _moe_gpt(num_experts=8)
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


# ----------------------------------------------------------------------------------- traces


def test_trace_record_save_load(tmp_path):
    model = _moe_gpt()
    ids = torch.randint(0, 128, (2, 20))
    trace = record_trace(model, ids, meta={"source": "test"})
    assert len(trace) == 2 * 20 * 3 and trace.num_tokens == 40 and trace.num_experts == [8, 8, 8]
    acc = trace.accesses()
    assert [layer for layer, _ in acc[:6]] == [0, 1, 2, 0, 1, 2]
    assert all(len(e) == 2 for _, e in acc)
    # the recorded experts are the routing of a whole-sequence forward, token by token
    model(ids[1:2])
    r = model.blocks[2].ffn.last_routing
    top = r.expert.view(20, 2)[7].tolist()
    assert sorted(acc[(20 + 7) * 3 + 2][1]) == sorted(top)
    w = trace.gate_weights()
    assert all(a >= b for a, b in w)  # by decreasing weight
    trace.save(tmp_path / "t.safetensors")
    back = Trace.load(tmp_path / "t.safetensors")
    assert back.accesses() == acc and back.meta == {"source": "test"} and torch.equal(back.token_ids, trace.token_ids)
    assert trace.head(5).num_tokens == 5 and len(trace.head(5)) == 15
    with pytest.raises(FileNotFoundError, match="record one"):
        Trace.load(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a moekit trace"):
        Trace.load(tmp_path / "other.safetensors")


# ----------------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("policy,partition", [("lru", "layer"), ("lfu", "global"), ("belady", "layer")])
@pytest.mark.parametrize("budget", [0.125, 0.5])
def test_served_decode_is_exact_and_matches_the_simulator(served, policy, partition, budget):
    model, store = served
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 24))
    trace = record_trace(ref, ids)
    future = Future(trace.accesses()) if policy == "belady" else None
    server = offload(model, store, budget=budget, policy=policy, partition=partition, future=future)
    assert not any(isinstance(p, torch.nn.Parameter) and p.dim() == 3 for p in model.parameters())
    with torch.no_grad():
        assert (_decode(model, ids) - ref(ids)).abs().max() <= 1e-5
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
    model, store, ref, ids, trace, acc, tokens = _traced(served, 24)
    server = offload(model, store, budget=0.25, policy=policy, window=8, future=Future(acc, tokens), direct=direct)
    with torch.no_grad():
        assert (_decode(model, ids) - ref(ids)).abs().max() <= 1e-5
    s = server.stats()
    sim = simulate(acc, server.expert_bytes, trace.num_experts, server.budget_bytes, policy, "layer", 8, tokens,
                   direct=direct)
    assert (s.hits, s.misses, s.direct, s.bytes_loaded) == (sim.hits, sim.misses, sim.direct, sim.bytes_loaded)
    assert s.direct > 0 and s.bytes_read == s.bytes_loaded and s.read_s > 0
    assert s.resident_bytes <= server.budget_bytes
    assert server.stream_buf.numel() * 4 <= 16 << 10  # the streaming buffer is a few rows, not an expert


def test_from_the_store_with_biases_fp16_and_a_corrupt_block(tmp_path):
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, "topk", activation="gelu", bias=True).eval()
    with torch.no_grad():
        for b in (moe.experts.up_proj_bias, moe.experts.down_proj_bias):
            b.normal_()
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
    model, store, ref, ids, trace, acc, tokens = _traced(served, 24)
    server = offload(model, store, budget=0.25, host="ram", direct=direct)
    assert server.device == torch.device("cpu")  # the model's
    assert server.read_s == server.exposed_s == 0 and not server.cache.where  # calibration leaves no trace
    with torch.no_grad():
        assert (_decode(model, ids) - ref(ids)).abs().max() <= 1e-5
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("host", ["disk", "ram"])
def test_gpu_cache_with_cpu_compute_fallback(served, host):
    model, store, ref, ids, trace, acc, tokens = _traced(served, 24)
    server = offload(model.cuda(), store, budget=0.25, host=host, direct="cost", device="cuda")
    with torch.no_grad():
        assert (_decode(model, ids.cuda()).cpu() - ref(ids)).abs().max() <= 1e-4
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
    model, store, ref, ids, trace, acc, tokens = _traced(served, 20)
    server = offload(model, store, budget=0.5, policy="belady", partition=partition, window=window,
                     future=Future(acc, tokens), prefetch="future")
    with torch.no_grad():
        assert (_decode(model, ids) - ref(ids)).abs().max() <= 1e-5
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
    model = _moe_gpt()
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
    logits = _decode(model, ids)
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


def test_load_offloaded_never_loads_the_experts(tmp_path):
    model = _moe_gpt()
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
    other = _moe_gpt(num_experts=4)
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match="another model"):
        load_offloaded(tmp_path / "other", store=tmp_path / "model" / "experts")


def test_generate_cli_and_engine(tmp_path, capsys):
    from moekit.apps.cli.main import main
    from moekit.data import train_tokenizer
    from moekit.offload.engine import Engine, parse_budget

    texts = ["the cat sat on the mat and the dog ran to the park"] * 20 + ["a bird sang in the tall green tree"] * 20
    tok, _ = train_tokenizer(texts, 300, cache_dir=tmp_path / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                          d_ff=64).with_moe(8, 2))
    model.save(tmp_path / "run" / "model")
    (tmp_path / "run" / "tokenizer.json").write_text(tok.to_str())
    args = ["generate", "--model", str(tmp_path / "run" / "model"), "--prompt", "the cat", "--max-new-tokens", "8"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--offload", "--budget", "25%", "--prefetch", "gate", "--low-threshold", "0.0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and plain.startswith("the cat")
    assert main(args + ["--offload", "--budget", "25%", "--direct", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "computed from the store" in captured.err
    assert main(args + ["--offload", "--host", "ram", "--direct", "cost"]) == 0
    assert capsys.readouterr().out == plain
    with pytest.raises(SystemExit, match="add --offload"):
        main(args + ["--direct", "2"])
    with pytest.raises(SystemExit):
        main(args + ["--offload", "--direct", "0"])
    assert "hit rate" in captured.err and (tmp_path / "run" / "model" / "experts" / "manifest.json").exists()
    engine = Engine(tmp_path / "run" / "model", budget=0.5)
    assert "the cat" + engine.generate("the cat", 8) + "\n" == plain
    assert engine.stats().tokens > 0
    engine.close()
    assert parse_budget("25%") == 0.25 and parse_budget("64MiB") == 64 * 2**20 and parse_budget("1.5GB") == 1_500_000_000
    assert parse_budget("0.5") == 0.5 and parse_budget("300000") == 300000 and parse_budget("100%") == 1.0
    for bad in ("lots", "0%", "150%"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


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
    forwards = 1 + 12  # the prompt, then one token at a time
    assert server.future.length == forwards * 3  # every forward told the future its 3 layers' experts first
    assert s.misses <= 4 + forwards  # only layer 0 can miss: every later layer was prefetched while the one before ran
    server.close()
    with pytest.raises(ValueError, match="PreGate"):
        offload(_moe_gpt(), write_store(_moe_gpt(), tmp_path / "s"), future="pregate")
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
    model = _moe_gpt()
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
