"""Fixtures of the offload tests."""

import pytest

from moekit.offload import write_store
from tests.offload.helpers import moe_gpt


@pytest.fixture
def served(tmp_path):
    """A small MoE GPT and the expert store written from it."""
    model = moe_gpt()
    store = write_store(model, tmp_path / "store")
    return model, store
