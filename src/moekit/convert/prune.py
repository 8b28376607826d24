"""Structured pruning, the baseline at equal active size: keep each FFN's most important channels."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.convert.build import bias_flags, dense_from_channels, empty_dense
from moekit.convert.calibration import MIN_CALIBRATION_TOKENS, channel_importance
from moekit.convert.ffn import DenseFFN, FFNSite
from moekit.convert.method import ConversionMethod, register_method

__all__ = ["Prune", "prune"]


@register_method("prune")
class Prune(ConversionMethod):
    """Structured pruning: see :func:`prune`."""

    empty_layer = staticmethod(empty_dense)

    def __init__(self, keep: float, calibration=None, run: Callable | None = None,
                 min_tokens: int = MIN_CALIBRATION_TOKENS, progress: bool = False) -> None:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"prune: keep must lie in (0, 1], got {keep!r}")
        self.keep, self.calibration, self.run, self.min_tokens, self.progress = keep, calibration, run, min_tokens, progress
        self.importance: list[Tensor] | None = None

    def settings(self) -> dict:
        return {"keep": self.keep, "score": "activation" if self.importance is not None else "weight"}

    def prepare(self, model: nn.Module) -> None:
        if self.calibration is not None:
            self.importance = channel_importance(model, self.calibration, self.run, self.min_tokens,
                                                 progress=self.progress)[0]

    def build(self, site: FFNSite, ffn: DenseFFN) -> tuple[nn.Module, dict]:
        score = self.importance[site.layer] if self.importance is not None else (
            ffn.up.norm(dim=1) * ffn.down.norm(dim=0) * (ffn.gate.norm(dim=1) if ffn.gate is not None else 1))
        n = max(1, round(self.keep * ffn.d_ff))
        channels = torch.sort(torch.topk(score, n).indices).values
        spec = {"kind": "dense", "d_ff": n, "activation": ffn.activation, **bias_flags(ffn),
                "channels": channels.tolist()}
        return dense_from_channels(ffn, channels), spec


def prune(model: nn.Module, keep: float, calibration=None, run: Callable | None = None,
          min_tokens: int = MIN_CALIBRATION_TOKENS, progress: bool = False) -> nn.Module:
    """Structured pruning, the baseline at equal active size: keep the ``keep`` fraction of each FFN's
    hidden channels with the largest mean ``|h|`` on the calibration tokens (or, without calibration,
    the largest ``||up_c|| * ||down_c||`` weight magnitude)."""
    return Prune(keep, calibration, run, min_tokens, progress).convert(model)
