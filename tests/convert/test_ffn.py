"""Model families (moekit/convert/ffn.py): finding FFNs, unsupported architectures, register_family."""

import pytest
import torch
from torch import nn

import moekit.convert.ffn as ffn_registry
from moekit.convert import (
    ConvertedFFN,
    DenseFFN,
    Family,
    FFNSite,
    find_ffns,
    partition,
    prune,
    register_family,
    supported_families,
    upcycle,
)
from tests.convert.models import VOCAB, _calibration, _force_all_on, _ids, _max_diff, _moes, _out


@pytest.mark.parametrize("convert", [lambda m: partition(m, 2), lambda m: upcycle(m, 2), lambda m: prune(m, 0.5)])
def test_unsupported_architecture(convert):
    with pytest.raises(ValueError, match=r"unsupported architecture Sequential; supported families: \[.*'llama'.*\]"
                                         r".*register_family"):
        convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="supported families"):
        find_ffns(nn.Linear(2, 2))


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
