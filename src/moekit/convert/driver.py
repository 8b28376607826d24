"""The one driver of every conversion: copy the model, replace each FFN, record what was done.

For a Hugging Face model each new layer is wrapped in :class:`~moekit.convert.build.ConvertedFFN`
(which adds the dense down-projection bias once), the record lives in ``model.moekit_convert`` and
the copy's ``save_pretrained`` writes what ``moekit.convert.load`` reads
(:class:`~moekit.convert.export.SavePretrained`); moekit's GPT takes the layers as they are and
records the conversion in its config too, so that ``GPT.save`` / ``GPT.load`` carry it.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Protocol

from torch import nn

from moekit.convert.build import ConvertedFFN, RoutingContext
from moekit.convert.export import bind_save_pretrained
from moekit.convert.ffn import DenseFFN, FFNSite, family_of, find_ffns
from moekit.models import GPT

__all__ = ["Method", "convert_model", "gpt_spec"]


class Method(Protocol):
    """What the driver calls on a method (:class:`~moekit.convert.method.ConversionMethod` documents each)."""

    name: str
    routed_by_context: bool

    def prepare(self, model: nn.Module) -> None: ...

    def build(self, site: FFNSite, ffn: DenseFFN) -> tuple[nn.Module, dict]: ...

    def attach(self, model: nn.Module, context: RoutingContext | None) -> dict: ...

    def settings(self) -> dict: ...


def gpt_spec(spec: dict) -> dict:
    """The per-layer spec without bookkeeping that GPTConfig does not need (kept in moekit_convert)."""
    return {k: v for k, v in spec.items() if k not in ("groups", "channels")}


def convert_model(model: nn.Module, method: Method) -> nn.Module:
    """A copy of ``model`` with every FFN replaced by what ``method.build`` returns (see
    :class:`~moekit.convert.method.ConversionMethod` for the order of the calls)."""
    family = family_of(model)
    method.prepare(model)
    new = copy.deepcopy(model)
    native = isinstance(new, GPT)
    context = RoutingContext() if method.routed_by_context else None
    specs = []
    for site in find_ffns(new):
        ffn = site.read()
        module, spec = method.build(site, ffn)
        if native:
            if ffn.has_bias:
                raise ValueError("moekit.convert: GPT FFNs with biases are not supported")
            site.install(module)
        else:
            site.install(ConvertedFFN(module, ffn.down_bias, context))
        specs.append(spec)
    extra = method.attach(new, context)
    settings = method.settings()
    if native:
        new.config = replace(new.config, ffn=[gpt_spec(s) for s in specs],
                             extra={**new.config.extra, "convert": {"method": method.name, **settings}})
    new.moekit_convert = {"family": family.name, "method": method.name, "settings": settings, "layers": specs, **extra}
    return new if native else bind_save_pretrained(new)
