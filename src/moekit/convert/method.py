"""Conversion methods behind a registry: how a dense model's FFNs become converted layers.

A method is a :class:`ConversionMethod` subclass registered by name with :func:`register_method`;
``moekit.convert`` registers partition (DSMoE), upcycle, prune and refactor (Read-ME). The
registry gives the command line its choices and :func:`moekit.convert.load` the class that rebuilds
a saved conversion's layers. :func:`moekit.convert.driver.convert_model` runs any method.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from moekit.convert.build import RoutingContext
from moekit.convert.driver import convert_model
from moekit.convert.ffn import DenseFFN, FFNSite
from moekit.registry import Registry

__all__ = ["ConversionMethod", "register_method", "available_methods", "method_class"]


class ConversionMethod:
    """One way to turn every FFN of a dense model into a converted layer; ``convert(model)`` returns
    a converted copy (the input model is untouched).

    The driver (:func:`~moekit.convert.driver.convert_model`) calls, in this order: ``prepare`` on
    the dense model, ``build`` for every FFN site of a deep copy (installing what it returns), then
    ``attach``; it records ``name``, ``settings()`` and every layer's spec in the copy's
    ``moekit_convert`` (and, for moekit's GPT, in its config). A subclass, registered with
    ``@register_method("name")``, implements:

    - ``__init__(...)``: the method's settings, checked before any model is looked at.
    - ``build(site, ffn) -> (module, spec)`` (required): for one FFN (``ffn``, a
      :class:`~moekit.convert.ffn.DenseFFN` read from ``site``; ``site.layer`` is its index), the
      module that replaces it, computing ``[..., D] -> [..., D]`` *without* the dense down-projection
      bias (the driver adds it once, with :class:`~moekit.convert.build.ConvertedFFN`), and the
      layer's spec: a JSON-able dict with ``kind`` (the GPT FFN kind: ``"moe"`` or ``"dense"``),
      its widths, router and activation, the :func:`~moekit.convert.build.bias_flags`, and any
      bookkeeping saved with the model but left out of a GPT config (``groups``, ``channels``).
    - ``empty_layer(spec, d_model) -> nn.Module`` (required, a static or class method): the module
      ``build`` made for ``spec`` with fresh weights; loading a saved Hugging Face conversion builds
      it and then loads the saved weights (:func:`~moekit.convert.build.empty_moe`,
      :func:`~moekit.convert.build.empty_dense`).
    - ``settings() -> dict``: the JSON-able settings recorded with the model (default: none).
    - ``prepare(model)``: look at the dense model first, e.g. check that the settings fit its FFNs
      or measure channel importance on calibration text (default: nothing).
    - ``routed_by_context`` (class attribute): ``True`` when the layers route by expert ids handed
      to them per forward through a :class:`~moekit.convert.build.RoutingContext` (Read-ME).
    - ``attach(model, context) -> dict``: model-level parts added once every FFN is replaced
      (Read-ME's PreGate); returns extra entries for the model's ``moekit_convert`` (default: none).
    - ``restore(model, record, context)`` (class method): put those parts back on a model being
      loaded from its saved ``record`` (default: nothing).
    """

    name: ClassVar[str] = ""
    routed_by_context: ClassVar[bool] = False

    def settings(self) -> dict:
        return {}

    def prepare(self, model: nn.Module) -> None:
        """Look at the dense model before it is copied (default: nothing)."""

    def build(self, site: FFNSite, ffn: DenseFFN) -> tuple[nn.Module, dict]:
        raise NotImplementedError(f"{type(self).__name__}.build")

    @staticmethod
    def empty_layer(spec: dict, d_model: int) -> nn.Module:
        raise NotImplementedError("ConversionMethod.empty_layer")

    def attach(self, model: nn.Module, context: RoutingContext | None) -> dict:
        return {}

    @classmethod
    def restore(cls, model: nn.Module, record: dict, context: RoutingContext | None) -> None:
        """Put the model-level parts of a saved conversion back on ``model`` (default: nothing)."""

    def convert(self, model: nn.Module) -> nn.Module:
        """A converted copy of ``model``."""
        return convert_model(model, self)


METHODS: Registry[type[ConversionMethod]] = Registry("conversion method")


def register_method(name: str):
    """Class decorator: make a :class:`ConversionMethod` subclass available as ``name``."""
    return METHODS.register(name)


def available_methods() -> list[str]:
    return METHODS.names()


def method_class(name: str) -> type[ConversionMethod]:
    """The class registered as ``name`` (a ValueError naming the valid names otherwise)."""
    return METHODS.get(name)
