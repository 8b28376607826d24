"""Dense -> MoE conversion (``moekit.convert``): partition (DSMoE), upcycle, prune, save / load,
the family registry and its error messages, on tiny random models of every supported family."""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import moekit
import moekit.convert.ffn as ffn_registry
from moekit import MoE, Routing
from moekit.convert import (
    ConvertedFFN,
    DenseFFN,
    Family,
    FFNSite,
    active_fraction,
    cluster_groups,
    contiguous_groups,
    find_ffns,
    partition,
    prune,
    register_family,
    supported_families,
    upcycle,
)
from moekit.convert.saving import CONVERT_FILE, load, save
from moekit.layer import FFN
from moekit.models import GPT, GPTConfig
from moekit.routers import SigmoidSTE, TopK
from tests.faults import edit_json, flip_byte, resign

VOCAB = 100
HF_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
FAMILIES = ["gpt", "llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"]
D_FF = {"gpt": 64, "llama": 64, "mistral": 64, "qwen2": 64, "qwen3": 64, "gpt2": 128, "bert": 64}
CAUSAL = {"gpt", "llama", "mistral", "qwen2", "qwen3", "gpt2"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dense(family: str) -> nn.Module:
    """A tiny random dense model of ``family`` (eval mode), the same one for the same family."""
    torch.manual_seed(0)
    T = transformers
    if family == "gpt":
        m = GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=64))
    elif family == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**HF_SMALL))
    elif family == "mistral":
        m = T.MistralForCausalLM(T.MistralConfig(**HF_SMALL))
    elif family == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**HF_SMALL))
    elif family == "qwen3":
        m = T.Qwen3ForCausalLM(T.Qwen3Config(**HF_SMALL, head_dim=8))
    elif family == "gpt2":  # d_ff = 4 * n_embd = 128, Conv1D layers with biases, gelu_new
        m = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    elif family == "bert":  # biases, FFN split over intermediate.dense and output.dense
        m = T.BertModel(T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB, pad_token_id=0))
    else:
        raise KeyError(family)
    return m.eval()


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (causal LMs) or the last hidden state (BERT)."""
    return model(ids) if isinstance(model, GPT) else model(input_ids=ids)[0]


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = _out(model, ids).float()
    if isinstance(model, transformers.BertModel):
        return out.pow(2).mean()
    return nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def _ids(B: int = 2, T: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _moes(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _every_expert_on(moe: MoE):
    """A forward that ignores the router: every (token, expert) pair at weight 1."""
    orig = moe.forward

    def forward(x, routing=None, **context):
        T, E = x.reshape(-1, x.shape[-1]).shape[0], moe.num_experts
        every = Routing(torch.arange(T).repeat_interleave(E), torch.arange(E).repeat(T),
                        torch.ones(T * E, dtype=x.dtype), T, E)
        return orig(x, routing=every)

    return forward


def _force_all_on(model: nn.Module, monkeypatch) -> None:
    moes = _moes(model)
    assert moes
    for moe in moes:
        monkeypatch.setattr(moe, "forward", _every_expert_on(moe))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def _hidden_widths(model: nn.Module) -> list[int]:
    """The hidden width of every (converted) FFN of the model, in layer order."""
    mods = [b.ffn for b in model.blocks] if isinstance(model, GPT) else \
        [m.ffn for m in model.modules() if isinstance(m, ConvertedFFN)]
    assert all(isinstance(m, FFN) for m in mods)
    return [m.up_proj.out_features for m in mods]


def _calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (16, 40), generator=torch.Generator().manual_seed(2))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------- partition


@pytest.mark.parametrize("grouping,features", [("contiguous", "weights"), ("cluster", "weights"),
                                               ("cluster", "activations")])
@pytest.mark.parametrize("family", FAMILIES)
def test_partition_with_every_expert_on_equals_the_dense_model(family, grouping, features, monkeypatch):
    dense = _dense(family)
    before = _state(dense)
    ids = _ids()
    ref = _out(dense, ids)
    calib = _calibration() if features == "activations" else None
    moe = partition(dense, 4, grouping=grouping, features=features, calibration=calib).eval()

    # the input model is untouched, the copy has one 4-expert MoE per layer with the default router
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    assert not _moes(dense)
    moes = _moes(moe)
    assert len(moes) == 2
    assert all(m.num_experts == 4 and m.d_ff == D_FF[family] // 4 and isinstance(m.gate, SigmoidSTE) for m in moes)

    # every layer's groups are a partition of the hidden channels into equal sets
    info = moe.moekit_convert
    assert info["method"] == "partition" and info["settings"]["grouping"] == grouping
    for spec in info["layers"]:
        groups = torch.tensor(spec["groups"])
        assert groups.shape == (4, D_FF[family] // 4)
        assert torch.equal(groups.flatten().sort().values, torch.arange(D_FF[family]))
        if grouping == "contiguous":
            assert torch.equal(groups, contiguous_groups(D_FF[family], 4))

    _force_all_on(moe, monkeypatch)
    with torch.no_grad():
        out = _out(moe, ids)
    assert _max_diff(out, ref) <= 1e-5
    assert active_fraction(moe) == 1.0


def test_partition_clusters_differ_from_blocks_and_follow_the_seed():
    dense = _dense("llama")
    a = partition(dense, 4, grouping="cluster", seed=0).moekit_convert["layers"][0]["groups"]
    b = partition(dense, 4, grouping="cluster", seed=0).moekit_convert["layers"][0]["groups"]
    assert a == b
    assert a != contiguous_groups(64, 4).tolist()  # random weights: clusters are not the contiguous blocks


def test_partition_in_float64_is_exact(monkeypatch):
    dense = _dense("gpt2").double()
    ids = _ids()
    ref = _out(dense, ids)
    moe = partition(dense, 8, router="topk", router_args={"k": 2}).eval()
    assert {p.dtype for p in moe.parameters()} == {torch.float64}
    _force_all_on(moe, monkeypatch)
    with torch.no_grad():
        assert _max_diff(_out(moe, ids), ref) <= 1e-10


def test_partition_router_settings_reach_every_layer():
    moe = partition(_dense("qwen2"), 2, router="topk", router_args={"k": 1})
    assert all(isinstance(m.gate, TopK) and m.gate.k == 1 for m in _moes(moe))
    assert moe.moekit_convert["settings"]["router_args"] == {"k": 1}
    gpt = partition(_dense("gpt"), 2, router="topk", router_args={"k": 1})
    assert gpt.config.layer_ffn(1) == {"kind": "moe", "num_experts": 2, "d_ff": 32, "router": "topk",
                                       "router_args": {"k": 1}, "activation": "swiglu", "bias": False,
                                       "out_bias": False}
    assert gpt.config.extra["convert"]["method"] == "partition"


# ----------------------------------------------------------------------------------- cluster_groups


def _is_partition(groups: torch.Tensor, F: int, E: int) -> bool:
    return groups.shape == (E, F // E) and torch.equal(groups.flatten().sort().values, torch.arange(F)) and \
        all(torch.equal(row, row.sort().values) for row in groups)


@pytest.mark.parametrize("E", [1, 2, 4, 8, 32])
def test_cluster_groups_is_a_balanced_partition(E):
    feats = torch.randn(32, 12)
    groups = cluster_groups(feats, E)
    assert _is_partition(groups, 32, E)


def test_cluster_groups_is_deterministic_for_a_seed():
    feats = torch.randn(48, 10)
    for seed in (0, 3):
        assert torch.equal(cluster_groups(feats, 4, seed=seed), cluster_groups(feats, 4, seed=seed))
    assert _is_partition(cluster_groups(feats, 4, seed=7), 48, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cluster_groups_recovers_separated_blobs(seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(16)[[0, 4, 8, 12]] * 5  # 4 orthogonal directions
    feats = centres.repeat_interleave(8, dim=0) + 0.1 * torch.randn(32, 16, generator=g)
    perm = torch.randperm(32, generator=g)
    feats = feats[perm]  # row perm[i] of the blobs is now row i
    blob_of_row = torch.arange(32).div(8, rounding_mode="floor")[perm]
    blobs = {frozenset(torch.nonzero(blob_of_row == b).squeeze(1).tolist()) for b in range(4)}
    groups = cluster_groups(feats, 4, seed=seed)
    assert {frozenset(row.tolist()) for row in groups} == blobs


def test_cluster_groups_errors():
    with pytest.raises(ValueError, match=r"num_experts=5 does not divide d_ff=32; valid counts: \[1, 2, 4, 8, 16, 32\]"):
        cluster_groups(torch.randn(32, 4), 5)
    with pytest.raises(ValueError, match="num_experts=0 does not divide"):
        contiguous_groups(32, 0)


# ----------------------------------------------------------------------------------- upcycle


@pytest.mark.parametrize("family", FAMILIES)
def test_upcycle_equals_the_dense_model(family):
    dense = _dense(family)
    ids = _ids()
    ref = _out(dense, ids)
    up = upcycle(dense, 4).eval()
    moes = _moes(up)
    assert len(moes) == 2
    for m in moes:
        assert isinstance(m.gate, TopK) and m.gate.k == 2 and m.gate.renormalize
        assert m.num_experts == 4 and m.d_ff == D_FF[family]
        w = m.experts.first_proj
        assert all(torch.equal(w[e], w[0]) for e in range(4))  # copies of the dense FFN
    with torch.no_grad():
        assert _max_diff(_out(up, ids), ref) <= 1e-5
    assert up.moekit_convert["method"] == "upcycle"


@pytest.mark.parametrize("family", ["gpt", "llama", "gpt2", "bert"])
def test_upcycled_model_trains(family):
    up = upcycle(_dense(family), 4).train()
    ids = _ids(4, 12)
    before = [m.experts.down_proj.detach().clone() for m in _moes(up)]
    opt = torch.optim.SGD(up.parameters(), lr=0.5)
    loss = _loss(up, ids) + moekit.aux_loss(up)
    assert torch.isfinite(loss)
    loss.backward()
    for m in _moes(up):
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
        assert m.experts.down_proj.grad is not None and m.experts.down_proj.grad.abs().sum() > 0
    opt.step()
    after = [m.experts.down_proj.detach() for m in _moes(up)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert torch.isfinite(_loss(up, ids))


def test_upcycle_expert_width_and_router_args():
    up = upcycle(_dense("llama"), 3, k=1, expert_d_ff=16)
    assert all(m.d_ff == 16 and m.gate.k == 1 for m in _moes(up))
    up = upcycle(_dense("llama"), 4, router="softmax")
    assert up.moekit_convert["settings"]["router"] == "softmax"
    with pytest.raises(ValueError, match=r"expert_d_ff must lie in \[1, 64\], got 65"):
        upcycle(_dense("llama"), 2, expert_d_ff=65)


# ----------------------------------------------------------------------------------- prune


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_keep_all_equals_dense_and_half_halves(family):
    dense = _dense(family)
    ids = _ids()
    ref = _out(dense, ids)
    full = prune(dense, 1.0).eval()
    assert _hidden_widths(full) == [D_FF[family]] * 2
    with torch.no_grad():
        assert _max_diff(_out(full, ids), ref) <= 1e-5
    half = prune(dense, 0.5).eval()
    assert _hidden_widths(half) == [D_FF[family] // 2] * 2
    assert [len(s["channels"]) for s in half.moekit_convert["layers"]] == [D_FF[family] // 2] * 2
    assert half.moekit_convert["settings"] == {"keep": 0.5, "score": "weight"}
    with torch.no_grad():
        assert torch.isfinite(_out(half, ids)).all()


def test_prune_without_calibration_keeps_the_largest_weight_norms():
    dense = _dense("gpt2")
    half = prune(dense, 0.25)
    mlp = dense.transformer.h[1].mlp
    up, down = mlp.c_fc.weight.T, mlp.c_proj.weight.T  # Conv1D stores [in, out]
    score = up.norm(dim=1) * down.norm(dim=0)
    want = torch.topk(score, 32).indices.sort().values
    assert half.moekit_convert["layers"][1]["channels"] == want.tolist()
    conv = half.transformer.h[1].mlp
    torch.testing.assert_close(conv.ffn.up_proj.weight, up[want], rtol=0, atol=0)
    torch.testing.assert_close(conv.ffn.up_proj.bias, mlp.c_fc.bias[want], rtol=0, atol=0)
    torch.testing.assert_close(conv.out_bias, mlp.c_proj.bias, rtol=0, atol=0)


def test_prune_with_calibration_keeps_the_most_active_channels():
    dense = _dense("gpt")
    calib = _calibration()
    # direct computation: mean |input of down_proj| over every calibration token, layer 0
    seen = []
    h = dense.blocks[0].ffn.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        dense(calib)
    h.remove()
    score = torch.cat(seen).abs().mean(0)
    want = torch.topk(score, 32).indices.sort().values

    pruned = prune(dense, 0.5, calibration=calib)
    assert pruned.moekit_convert["settings"] == {"keep": 0.5, "score": "activation"}
    assert pruned.moekit_convert["layers"][0]["channels"] == want.tolist()
    src, dst = dense.blocks[0].ffn, pruned.blocks[0].ffn
    assert isinstance(dst, FFN) and dst.up_proj.out_features == 32 and pruned.config.layer_ffn(0)["d_ff"] == 32
    assert torch.equal(dst.up_proj.weight, src.up_proj.weight[want])
    assert torch.equal(dst.gate_proj.weight, src.gate_proj.weight[want])
    assert torch.equal(dst.down_proj.weight, src.down_proj.weight[:, want])
    # the calibration (weight-free) ranking is not the weight-norm one on this model
    assert prune(dense, 0.5).moekit_convert["layers"][0]["channels"] != want.tolist()


def test_prune_errors():
    for keep in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep must lie in"):
            prune(_dense("gpt"), keep)


# ----------------------------------------------------------------------------------- training


@pytest.mark.parametrize("family", FAMILIES)
def test_partitioned_model_trains_with_the_sparsity_loss(family):
    moe = partition(_dense(family), 4).train()
    ids = _ids(4, 12)
    loss = _loss(moe, ids)
    aux = moekit.aux_loss(moe)
    moes = _moes(moe)
    assert all(set(m.last_routing.losses) == {"sparsity"} for m in moes)
    torch.testing.assert_close(aux, sum(m.last_routing.losses["sparsity"] for m in moes))
    assert aux.item() > 0
    (loss + aux).backward()
    for m in moes:
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
        assert m.experts.first_proj.grad is not None and m.experts.first_proj.grad.abs().sum() > 0
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    router_before = moes[0].gate.weight.detach().clone()
    opt.step()
    assert not torch.equal(moes[0].gate.weight, router_before)
    assert torch.isfinite(_loss(moe, ids))


# ----------------------------------------------------------------------------------- save / load


def _converted(family: str, method: str) -> nn.Module:
    dense = _dense(family)
    if method == "partition":
        return partition(dense, 4, grouping="cluster")
    if method == "upcycle":
        return upcycle(dense, 4)
    return prune(dense, 0.5)


@pytest.mark.parametrize("method", ["partition", "upcycle", "prune"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, method, tmp_path):
    conv = _converted(family, method).eval()
    ids = _ids()
    with torch.no_grad():
        ref = _out(conv, ids)
    save(conv, tmp_path)
    back = load(tmp_path).eval()
    assert type(back) is type(conv)
    with torch.no_grad():
        assert torch.equal(_out(back, ids), ref)
    assert back.state_dict().keys() == conv.state_dict().keys()
    if family == "gpt":
        assert back.config.extra["convert"]["method"] == method
        assert back.config == conv.config
    else:
        meta = json.loads((tmp_path / CONVERT_FILE).read_text())
        assert meta["method"] == method and meta["family"] == family and len(meta["layers"]) == 2
        assert back.moekit_convert["method"] == method
        assert back.moekit_convert["layers"] == conv.moekit_convert["layers"]


@pytest.mark.parametrize("family", ["gpt", "gpt2"])
def test_load_with_dtype_casts_the_converted_layers_too(family, tmp_path):
    conv = partition(_dense(family), 4, router="topk").eval()
    ids = _ids()
    with torch.no_grad():
        ref = _out(conv, ids)
    save(conv, tmp_path)
    back = load(tmp_path, dtype=torch.float64).eval()
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    with torch.no_grad():
        assert _max_diff(_out(back, ids).float(), ref) <= 1e-5


def test_loaded_model_keeps_training(tmp_path):
    save(partition(_dense("llama"), 4), tmp_path)
    back = load(tmp_path).train()
    loss = _loss(back, _ids()) + moekit.aux_loss(back)
    loss.backward()
    assert all(m.gate.weight.grad is not None for m in _moes(back))


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("convert", [lambda m: partition(m, 2), lambda m: upcycle(m, 2), lambda m: prune(m, 0.5)])
def test_unsupported_architecture(convert):
    with pytest.raises(ValueError, match=r"unsupported architecture Sequential; supported families: \[.*'llama'.*\]"
                                         r".*register_family"):
        convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="supported families"):
        find_ffns(nn.Linear(2, 2))


@pytest.mark.parametrize("family,E,valid", [("llama", 5, "[1, 2, 4, 8, 16, 32, 64]"),
                                            ("gpt2", 3, "[1, 2, 4, 8, 16, 32, 64]"),
                                            ("gpt", 0, "[1, 2, 4, 8, 16, 32, 64]")])
def test_expert_count_must_divide_the_hidden_width(family, E, valid):
    with pytest.raises(ValueError, match=f"num_experts={E} does not divide d_ff={D_FF[family]}; "
                                         f"valid counts: {re.escape(valid)}"):
        partition(_dense(family), E)


def test_bad_partition_settings():
    dense = _dense("gpt")
    with pytest.raises(ValueError, match="grouping must be 'contiguous' or 'cluster', got 'random'"):
        partition(dense, 2, grouping="random")
    with pytest.raises(ValueError, match="features must be 'weights' or 'activations'"):
        partition(dense, 2, grouping="cluster", features="gradients")
    with pytest.raises(TypeError, match="pass the router by name"):
        partition(dense, 2, router=TopK(k=1))
    with pytest.raises(ValueError, match="layer 0 of the GPT is not a dense FFN"):
        partition(partition(dense, 2), 2)


def test_calibration_errors():
    dense = _dense("llama")
    with pytest.raises(ValueError, match="calibration text too small: 4 tokens, need at least 512"):
        partition(dense, 4, grouping="cluster", features="activations", calibration=torch.randint(0, VOCAB, (1, 4)))
    with pytest.raises(ValueError, match="needs calibration token ids"):
        partition(dense, 4, grouping="cluster", features="activations")
    with pytest.raises(ValueError, match=r"expected token ids \[num_sequences, seq_len\]"):
        partition(dense, 4, grouping="cluster", features="activations", calibration=torch.randn(16, 40))
    with pytest.raises(ValueError, match="calibration text too small: 40 tokens"):
        prune(dense, 0.5, calibration=torch.randint(0, VOCAB, (2, 20)))
    # a smaller minimum is honoured
    small = partition(dense, 4, grouping="cluster", features="activations",
                      calibration=torch.randint(0, VOCAB, (2, 20)), min_tokens=40)
    assert len(_moes(small)) == 2


@pytest.fixture
def saved_llama(tmp_path) -> Path:
    save(partition(_dense("llama"), 4), tmp_path)
    return tmp_path


def _edit_json(path: Path, edit) -> None:
    edit_json(path, edit)  # re-signed: the checks behind the checksums


def test_load_rejects_a_conversion_file_that_does_not_match(saved_llama):
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d["layers"].pop())
    with pytest.raises(ValueError, match=r"the saved conversion \(llama, 1 FFNs\) does not match the model built "
                                         r"from config.json \(llama, 2 FFNs\)"):
        load(saved_llama)


def test_load_rejects_a_config_that_does_not_match(saved_llama):
    _edit_json(saved_llama / "config.json", lambda d: d.update(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"\(llama, 2 FFNs\) does not match .* \(llama, 3 FFNs\)"):
        load(saved_llama)


def test_load_rejects_layer_specs_that_do_not_match_the_weights(saved_llama):
    def edit(d):
        d["layers"][0].update(num_experts=2, d_ff=32)

    _edit_json(saved_llama / CONVERT_FILE, edit)
    with pytest.raises(ValueError, match=r"weights do not match moekit_convert.json \(.*size mismatch"):
        load(saved_llama)


def test_load_rejects_a_foreign_format_and_family(saved_llama):
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d.update(format=99))
    with pytest.raises(ValueError, match="unsupported format 99"):
        load(saved_llama)
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d.update(format=1, family="qwen2"))
    with pytest.raises(ValueError, match=r"\(qwen2, 2 FFNs\) does not match .* \(llama, 2 FFNs\)"):
        load(saved_llama)
    _edit_json(saved_llama / CONVERT_FILE, lambda d: d.update(family="llama", **{"class": "NoSuchModel"}))
    with pytest.raises(ValueError, match="'NoSuchModel' is not a transformers model class"):
        load(saved_llama)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "flip"])
def test_load_with_a_damaged_weights_file(family, damage, tmp_path):
    save(partition(_dense(family), 4), tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "missing":
        weights.unlink()
        with pytest.raises(ValueError, match=r"model.safetensors: missing \(listed in moekit.json\)"):
            load(tmp_path)
        return
    if damage == "flip":  # one byte in the middle of the tensors: the file still parses
        flip_byte(weights)
        with pytest.raises(ValueError, match=r"model.safetensors: checksum mismatch"):
            load(tmp_path)
        return
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"model.safetensors: [\d,]+ bytes, moekit.json records [\d,]+ \(truncated"):
        load(tmp_path)
    resign(tmp_path)  # behind the checksum, safetensors' own error still names the file
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file \(truncated or corrupt"):
        load(tmp_path)


def test_load_and_save_of_things_that_are_not_converted_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="was it written by moekit.convert.save"):
        load(tmp_path)
    with pytest.raises(ValueError, match="was not converted by moekit.convert"):
        save(_dense("llama"), tmp_path / "x")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="no moekit.json: not a model folder moekit wrote"):
        load(tmp_path)
    (tmp_path / "moekit.json").write_text(json.dumps({"format": "moekit", "version": 1, "kind": "model", "files": {
        "config.json": {"bytes": 0, "sha256": ""}}}))
    resign(tmp_path)  # a manifest that lists a config that is neither moekit's nor a converted model's
    with pytest.raises(ValueError, match="neither a moekit GPT checkpoint nor a converted Hugging Face model"):
        load(tmp_path)


# ----------------------------------------------------------------------------------- register_family


class ToyMLP(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.fc_out(nn.functional.relu(self.fc_in(x)))


class ToyNet(nn.Module):
    """A token model with a list of residual MLP blocks, unknown to moekit.convert."""

    def __init__(self, vocab: int = VOCAB, d: int = 16, f: int = 48, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mlps = nn.ModuleList(ToyMLP(d, f) for _ in range(layers))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for mlp in self.mlps:
            x = x + mlp(x)
        return (x,)


def _toy_sites(model: ToyNet) -> list[FFNSite]:
    sites = []
    for i, mlp in enumerate(model.mlps):
        def read(mlp=mlp) -> DenseFFN:
            return DenseFFN(up=mlp.fc_in.weight.detach(), down=mlp.fc_out.weight.detach(), activation="relu",
                            up_bias=mlp.fc_in.bias.detach(), down_bias=mlp.fc_out.bias.detach())

        def install(m, i=i) -> None:
            model.mlps[i] = m

        sites.append(FFNSite(f"mlps.{i}", i, read, install, mlp.fc_out, lambda i=i: model.mlps[i]))
    return sites


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setattr(ffn_registry, "_FAMILIES", dict(ffn_registry._FAMILIES))  # restored after the test
    return register_family(Family("toy", lambda m: isinstance(m, ToyNet), _toy_sites, "ToyNet"))


def test_register_family_makes_partition_work(toy_family, monkeypatch):
    assert "toy" in supported_families()
    toy = ToyNet().eval()
    assert len(find_ffns(toy)) == 3
    ids = _ids()
    ref = _out(toy, ids)
    for grouping, features in (("contiguous", "weights"), ("cluster", "weights"), ("cluster", "activations")):
        moe = partition(toy, 4, grouping=grouping, features=features, calibration=_calibration()).eval()
        assert moe.moekit_convert["family"] == "toy"
        assert len(_moes(moe)) == 3 and all(isinstance(m, ConvertedFFN) for m in moe.mlps)
        with monkeypatch.context() as mp:
            _force_all_on(moe, mp)
            with torch.no_grad():
                assert _max_diff(_out(moe, ids), ref) <= 1e-5
    with torch.no_grad():
        assert _max_diff(_out(upcycle(toy, 2).eval(), ids), ref) <= 1e-5
        assert _max_diff(_out(prune(toy, 1.0).eval(), ids), ref) <= 1e-5
    with pytest.raises(ValueError, match=r"valid counts: \[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"):
        partition(toy, 5)


def test_register_family_replaces_and_unsupported_lists_it(toy_family):
    with pytest.raises(ValueError, match=r"supported families: \[.*'toy'.*\]"):
        partition(nn.Sequential(nn.Linear(2, 2)), 2)
    register_family(Family("toy", lambda m: False, _toy_sites))
    assert supported_families().count("toy") == 1
    with pytest.raises(ValueError, match="unsupported architecture ToyNet"):
        partition(ToyNet(), 2)
