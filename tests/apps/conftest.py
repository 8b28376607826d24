"""Fixtures shared by the command-line tests."""

import pytest


@pytest.fixture
def corpus(tmp_path):
    """A small plain-text corpus (300 paragraphs) for `moekit train --data`."""
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(f"paragraph {i}: the cat sat on the mat and looked around." for i in range(300)),
                 encoding="utf-8")
    return p
