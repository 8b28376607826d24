"""Routers: each returns a :class:`moekit.Routing`. One file per router; one registry line each."""

from ..routing import LinearRouter, Router
from ._registry import available_routers, build_router, register_router
from .dselect import DSelectK
from .dynamic_k import DynamicK
from .expert_choice import ExpertChoice
from .pregate import PreGate, PreGated
from .sigmoid_ste import SigmoidSTE
from .softmax import Softmax
from .topk import TopK

__all__ = [
    "Router",
    "LinearRouter",
    "TopK",
    "ExpertChoice",
    "Softmax",
    "DSelectK",
    "SigmoidSTE",
    "DynamicK",
    "PreGate",
    "PreGated",
    "available_routers",
    "build_router",
    "register_router",
]
