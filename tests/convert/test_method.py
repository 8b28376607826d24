"""The registry of conversion methods (moekit/convert/method.py): a method registered here, a tiny
one that keeps each FFN's first channels, is picked up by ``available_methods()``, the command
line's choices and save / load."""

import argparse
import json

import pytest
import torch

import moekit.convert.method as method_registry
from moekit.apps.cli.convert import add_convert_arguments
from moekit.convert import (
    ConversionMethod,
    Partition,
    available_methods,
    load,
    method_class,
    register_method,
    save,
)
from moekit.convert.build import bias_flags, dense_from_channels, empty_dense
from moekit.convert.saving import CONVERT_FILE
from tests.convert.models import _dense, _ids, _out


class FirstChannels(ConversionMethod):
    """Each FFN keeps its first ``width`` hidden channels (a dense FFN)."""

    empty_layer = staticmethod(empty_dense)

    def __init__(self, width: int = 16) -> None:
        self.width = width

    def settings(self) -> dict:
        return {"width": self.width}

    def build(self, site, ffn):
        spec = {"kind": "dense", "d_ff": self.width, "activation": ffn.activation, **bias_flags(ffn)}
        return dense_from_channels(ffn, torch.arange(self.width)), spec


@pytest.fixture
def first_channels():
    yield register_method("first-channels")(FirstChannels)
    method_registry.METHODS.unregister("first-channels")


def test_the_built_in_methods_are_registered():
    assert available_methods() == ["partition", "prune", "refactor", "upcycle"]
    assert method_class("partition") is Partition and Partition.name == "partition"
    with pytest.raises(ValueError, match=r"unknown name 'nope'; valid names are \['partition', 'prune'"):
        method_class("nope")


def test_a_registered_method_is_listed_and_offered_by_the_command_line(first_channels):
    assert "first-channels" in available_methods()
    assert method_class("first-channels") is FirstChannels
    p = argparse.ArgumentParser()
    add_convert_arguments(p)
    args = p.parse_args(["--method", "first-channels", "--model", "m", "--out", "o"])
    assert args.method == "first-channels"
    with pytest.raises(ValueError, match="already registered to FirstChannels"):
        register_method("first-channels")(Partition)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_registered_method_converts_saves_and_loads(first_channels, family, tmp_path):
    dense = _dense(family)
    conv = FirstChannels(16).convert(dense).eval()
    assert conv.moekit_convert["method"] == "first-channels"
    assert conv.moekit_convert["settings"] == {"width": 16}
    ffn = conv.moekit_convert["layers"]
    assert [s["d_ff"] for s in ffn] == [16, 16]
    ids = _ids()
    with torch.no_grad():
        ref = _out(conv, ids)
    save(conv, tmp_path)
    assert json.loads((tmp_path / CONVERT_FILE).read_text())["method"] == "first-channels"
    back = load(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(_out(back, ids), ref)


def test_loading_a_conversion_by_an_unknown_method_names_it(first_channels, tmp_path):
    save(FirstChannels(16).convert(_dense("llama")), tmp_path)
    method_registry.METHODS.unregister("first-channels")
    with pytest.raises(ValueError, match=r"moekit_convert.json: conversion method: unknown name 'first-channels'"):
        load(tmp_path)


def test_a_method_must_build_and_rebuild_its_layers():
    with pytest.raises(NotImplementedError, match="build"):
        ConversionMethod().convert(_dense("gpt"))
    with pytest.raises(NotImplementedError, match="empty_layer"):
        ConversionMethod.empty_layer({}, 8)
