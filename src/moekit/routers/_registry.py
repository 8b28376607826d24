"""Name -> router class registry, so configs and the CLI can name routers by string."""

from __future__ import annotations

from moekit.registry import Registry
from moekit.routing import Router

ROUTERS: Registry[type[Router]] = Registry("router")


def register_router(name: str):
    """Class decorator: make a Router subclass buildable by ``name``."""
    return ROUTERS.register(name)


def available_routers() -> list[str]:
    return ROUTERS.names()


def router_class(name: str) -> type[Router]:
    """The class registered as ``name`` (a ValueError naming the valid names otherwise)."""
    return ROUTERS.get(name)


def build_router(spec: str | Router, **kwargs) -> Router:
    """A Router from an instance (returned as is) or a registered name plus keyword arguments."""
    if isinstance(spec, Router):
        if kwargs:
            raise ValueError(f"router: keyword arguments {sorted(kwargs)} given with a router instance")
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"router: expected a moekit Router or one of {available_routers()}, got {type(spec).__name__}"
        )
    return ROUTERS.get(spec)(**kwargs)
