"""Routers: each returns a :class:`moekit.Routing`. One file per router; one registry line each."""

from moekit.routers._registry import available_routers, build_router, register_router, router_class
from moekit.routers.dselect import DSelectK
from moekit.routers.dynamic_k import DynamicK
from moekit.routers.expert_choice import ExpertChoice
from moekit.routers.grouped import GroupedTopK
from moekit.routers.moepp import MoEPP
from moekit.routers.odp import ODP
from moekit.routers.pregate import PreGated
from moekit.routers.sigmoid_ste import SigmoidSTE
from moekit.routers.softmax import Softmax
from moekit.routers.topk import TopK
from moekit.routing import LinearRouter, Router

__all__ = [
    "Router",
    "LinearRouter",
    "TopK",
    "ExpertChoice",
    "Softmax",
    "DSelectK",
    "SigmoidSTE",
    "DynamicK",
    "PreGated",
    "GroupedTopK",
    "ODP",
    "MoEPP",
    "available_routers",
    "build_router",
    "register_router",
    "router_class",
]
