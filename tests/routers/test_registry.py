"""The router registry: build by name, register in one line, unknown names."""


import pytest

from moekit import MoE
from moekit.routers import TopK, available_routers, build_router, register_router


def test_registry_builds_by_name_and_rejects_unknown():
    assert {"topk", "expert_choice"} <= set(available_routers())
    assert isinstance(build_router("topk", k=3), TopK)
    with pytest.raises(ValueError, match=r"unknown name 'nope'.*valid names"):
        build_router("nope")
    with pytest.raises(ValueError, match="router: unknown name"):
        MoE(8, 8, 4, router="nope")


def test_register_router_one_line():
    @register_router("test_first_expert")
    class FirstExpert(TopK):
        pass

    assert isinstance(MoE(8, 8, 4, router="test_first_expert").gate, FirstExpert)
