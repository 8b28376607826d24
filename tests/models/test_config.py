"""GPTConfig: checked sizes, the MoE variant's widths, and a lossless dict round trip."""

import pytest

from moekit.models import GPTConfig


def test_with_moe_keeps_the_active_width_and_places_every_nth_layer():
    cfg = GPTConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, d_ff=96).with_moe(num_experts=6, k=3, every=2)
    assert [s["kind"] for s in cfg.ffn] == ["dense", "moe", "dense", "moe"]
    assert cfg.ffn[1] == {"kind": "moe", "num_experts": 6, "d_ff": 32, "router": "topk", "router_args": {"k": 3}}
    assert cfg.layer_ffn(0) == {"kind": "dense"} and GPTConfig(n_layers=2).layer_ffn(1) == {"kind": "dense"}


def test_dict_round_trip_and_diff():
    cfg = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2).with_moe(4, 1)
    back = GPTConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.diff(cfg) == {}
    other = GPTConfig.from_dict({**cfg.to_dict(), "d_ff": 512})
    assert cfg.diff(other) == {"d_ff": (1024, 512)}
    with pytest.raises(ValueError, match=r"unknown fields \['width'\]"):
        GPTConfig.from_dict({**cfg.to_dict(), "width": 3})


@pytest.mark.parametrize("bad,match", [
    ({"d_model": 0}, "d_model must be a positive int"),
    ({"n_layers": True}, "n_layers must be a positive int"),
    ({"d_model": 30, "n_heads": 4}, "must split into n_heads=4 heads of even width"),
    ({"n_layers": 2, "ffn": [{"kind": "dense"}]}, "ffn has 1 specs for n_layers=2"),
])
def test_bad_sizes_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**bad)
