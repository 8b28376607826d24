"""moekit: mixture-of-experts layers, routers, conversion and serving for PyTorch."""

from moekit import routers
from moekit.dispatch import LocalDispatcher, Segments
from moekit.experts import GroupedExperts, available_backends, register_backend
from moekit.layer import FFN, MoE, RoutingStats, aux_loss, routing_stats
from moekit.loader import generate, load, load_tokenizer
from moekit.routing import Router, Routing, load_balancing_loss, router_z_loss

__version__ = "0.1.0"

__all__ = [
    "MoE",
    "load",
    "load_tokenizer",
    "generate",
    "FFN",
    "GroupedExperts",
    "LocalDispatcher",
    "Segments",
    "Routing",
    "Router",
    "RoutingStats",
    "aux_loss",
    "routing_stats",
    "routers",
    "load_balancing_loss",
    "router_z_loss",
    "available_backends",
    "register_backend",
    "__version__",
]
