"""The slot expert-compression methods take: a base class, a registry, and the driver that applies a
method to every MoE layer of a model.

A method (merging, pruning, mixed precision...) is one file that subclasses
:class:`CompressionMethod` and registers it::

    @register_compression("drop-unused")
    class DropUnused(CompressionMethod):
        '''Remove the experts no calibration token was routed to.'''

        def compress_layer(self, moe, stats):
            keep = (stats.tokens > 0).nonzero().flatten()
            ...
            return smaller_moe

What a method implements:

- ``__init__(**settings)``: its hyper-parameters (keep them JSON-serialisable: they are recorded).
- ``compress_layer(moe, stats) -> nn.Module``: given one :class:`moekit.MoE` and the statistics
  the driver gathered on the calibration data (:class:`ExpertStats`: per-expert counts, masses,
  mean outputs, saliencies), return the module that replaces it (the same ``[..., D] -> [..., D]``
  contract); return ``moe`` itself to leave the layer unchanged. Never change the input layer in place.
- optionally ``calibrate(model, batches, run)``: called first with the calibration batches, for
  methods that need more than the statistics (PMQ caches each layer's inputs);
- optionally ``prepare(stats)``: called once with every layer's statistics (by layer name) before
  the layers are compressed, for decisions across layers (global pruning); and ``keep_inputs``:
  how many input rows per layer the statistics keep (for methods that match layer outputs).

The driver :func:`compress` runs the calibration batches once through the model with the
statistics hooks on, calls the method layer by layer, then updates the model's description
(:func:`moekit.compress.surgery.sync_config`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from moekit.compress.stats import ExpertStats, gather_stats
from moekit.compress.surgery import sync_config
from moekit.layer import MoE
from moekit.registry import Registry

__all__ = ["CompressionMethod", "available_compressions", "build_compression", "compress", "register_compression"]


class CompressionMethod:
    """Base class of expert-compression methods; see the module docstring for the contract."""

    #: the registered name (set by :func:`register_compression`)
    name: str = ""
    #: input rows per layer the calibration statistics keep for this method
    keep_inputs: int = 0

    def __init__(self, **settings) -> None:
        self.settings = settings

    def calibrate(self, model: nn.Module, batches: list, run: Callable[[nn.Module, object], object] | None) -> None:
        """Look at the calibration data before the statistics are gathered (nothing by default)."""

    def prepare(self, stats: dict[str, ExpertStats]) -> None:
        """See every layer's statistics before the layers are compressed (default: nothing)."""

    def compress_layer(self, moe: MoE, stats: ExpertStats) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement compress_layer(moe, stats)")


METHODS: Registry[type[CompressionMethod]] = Registry("compression", noun="method")


def register_compression(name: str):
    """Class decorator: make a :class:`CompressionMethod` buildable by ``name``."""
    return METHODS.register(name)


def available_compressions() -> list[str]:
    return METHODS.names()


def build_compression(name: str, **settings) -> CompressionMethod:
    return METHODS.get(name)(**settings)


def compress(model: nn.Module, method: CompressionMethod | str, batches: Iterable,
             run: Callable[[nn.Module, object], object] | None = None, **settings) -> nn.Module:
    """Compress every MoE layer of ``model`` in place with ``method`` (an instance, or a registered
    name plus its ``settings``), from the statistics of the calibration ``batches``; returns the model."""
    if isinstance(method, str):
        method = build_compression(method, **settings)
    elif settings:
        raise ValueError(f"compress: settings {sorted(settings)} given with a method instance")
    zc = [n for n, m in model.named_modules() if isinstance(m, MoE) and m.num_zc_experts]
    if zc:
        raise ValueError(f"compress: the layers {zc} have zero-computation experts (MoE++), which moekit.compress "
                         "does not handle; compress a model whose MoE layers have FFN experts only")
    batches = list(batches)  # read twice by methods that calibrate
    method.calibrate(model, batches, run)
    stats = gather_stats(model, batches, run, keep_inputs=method.keep_inputs)
    method.prepare(stats)
    for name, st in stats.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, method.compress_layer(owner.get_submodule(child), st))
    sync_config(model)
    return model
