"""moekit bench offload: where its models live, and Read-ME's topic domains."""

from pathlib import Path
from types import SimpleNamespace

import torch

from moekit.apps.bench.offload.fixtures import TRAINED_HERE, resolve_model, topic_domains


def test_resolve_model():
    assert resolve_model("some/dir") == Path("some/dir")
    assert resolve_model(None, quick=True) == Path(TRAINED_HERE + "-quick")


def test_topic_domains_take_the_largest_topics_but_uncategorized():
    docs = [SimpleNamespace(topic_en=t) for t in ("a", "Uncategorized", "b", "a", "Uncategorized", "Uncategorized")]
    doc = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 2 + [5] * 2)
    train = SimpleNamespace(docs=docs, doc=doc, ids=torch.arange(doc.numel()))
    domains = topic_domains(train, topics=1, seq_len=3)
    assert list(domains) == ["a"]
    # topic a: documents 0 and 3, tokens 0-3 and 12-15: two whole sequences of 3
    assert domains["a"].tolist() == [[0, 1, 2], [3, 12, 13]]
    assert list(topic_domains(train, topics=5, seq_len=3)) == ["a", "b"]
