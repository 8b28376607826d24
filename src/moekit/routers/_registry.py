"""Name -> router class registry, so configs and the CLI can name routers by string."""

from __future__ import annotations

from moekit.routing import Router

_ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    """Class decorator: make a Router subclass buildable by ``name``."""

    def deco(cls: type[Router]) -> type[Router]:
        if name in _ROUTERS and _ROUTERS[name] is not cls:
            raise ValueError(f"router name {name!r} is already registered to {_ROUTERS[name].__name__}")
        cls.name = name
        _ROUTERS[name] = cls
        return cls

    return deco


def available_routers() -> list[str]:
    return sorted(_ROUTERS)


def router_class(name: str) -> type[Router]:
    """The class registered as ``name`` (a ValueError naming the valid names otherwise)."""
    try:
        return _ROUTERS[name]
    except KeyError:
        raise ValueError(f"router: unknown name {name!r}; valid names are {available_routers()}") from None


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
    try:
        cls = _ROUTERS[spec]
    except KeyError:
        raise ValueError(f"router: unknown name {spec!r}; valid names are {available_routers()}") from None
    return cls(**kwargs)
