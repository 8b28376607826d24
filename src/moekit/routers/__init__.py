"""Routers: each returns a :class:`moekit.Routing`. One file per router; one registry line each."""

from ..routing import LinearRouter, Router
from ._registry import available_routers, build_router, register_router
from .expert_choice import ExpertChoice
from .topk import TopK

__all__ = [
    "Router",
    "LinearRouter",
    "TopK",
    "ExpertChoice",
    "available_routers",
    "build_router",
    "register_router",
]
