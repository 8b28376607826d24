"""The registry every method family uses: names, lookups, errors that name the valid choices."""

import pytest

from moekit.registry import Registry


def test_register_look_up_and_list():
    reg = Registry("widget", noun="kind")

    @reg.register("b")
    class B:
        pass

    @reg.register("a")
    def a():
        return 1

    assert reg.names() == ["a", "b"] and reg.get("b") is B and B.name == "b" and reg.get("a")() == 1
    assert "a" in reg and "c" not in reg and [n for n, _ in reg.items()] == ["a", "b"]
    with pytest.raises(ValueError, match=r"^widget: unknown kind 'c'; valid kinds are \['a', 'b'\]$"):
        reg.get("c")
    with pytest.raises(ValueError, match=r"^widget 'b' is already registered to B$"):
        reg.register("b")(type("Other", (), {}))
    assert reg.register("b")(B) is B  # registering the same object again is harmless
    reg.unregister("b")
    assert reg.names() == ["a"]


def test_ordered_registry_keeps_registration_order():
    reg = Registry("policy", noun="value", ordered=True)
    for name in ("lru", "lfu", "belady"):
        reg.register(name)(type(name, (), {}))
    assert reg.names() == ["lru", "lfu", "belady"] and [n for n, _ in reg.items()] == ["lru", "lfu", "belady"]
    with pytest.raises(ValueError, match=r"valid values are \['lru', 'lfu', 'belady'\]"):
        reg.get(None)
