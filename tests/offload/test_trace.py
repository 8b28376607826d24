"""moekit.offload.trace: routing traces recorded from a model, saved and loaded."""

import pytest
import torch
from safetensors.torch import save_file

from moekit.offload import Trace, record_trace
from tests.offload.helpers import moe_gpt


def test_trace_record_save_load(tmp_path):
    model = moe_gpt()
    ids = torch.randint(0, 128, (2, 20))
    trace = record_trace(model, ids, meta={"source": "test"})
    assert len(trace) == 2 * 20 * 3 and trace.num_tokens == 40 and trace.num_experts == [8, 8, 8]
    acc = trace.accesses()
    assert [layer for layer, _ in acc[:6]] == [0, 1, 2, 0, 1, 2]
    assert all(len(e) == 2 for _, e in acc)
    # the recorded experts are the routing of a whole-sequence forward, token by token
    model(ids[1:2])
    r = model.blocks[2].ffn.last_routing
    top = r.expert.view(20, 2)[7].tolist()
    assert sorted(acc[(20 + 7) * 3 + 2][1]) == sorted(top)
    w = trace.gate_weights()
    assert all(a >= b for a, b in w)  # by decreasing weight
    trace.save(tmp_path / "t.safetensors")
    back = Trace.load(tmp_path / "t.safetensors")
    assert back.accesses() == acc and back.meta == {"source": "test"} and torch.equal(back.token_ids, trace.token_ids)
    assert trace.head(5).num_tokens == 5 and len(trace.head(5)) == 15
    with pytest.raises(FileNotFoundError, match="record one"):
        Trace.load(tmp_path / "none.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a moekit trace"):
        Trace.load(tmp_path / "other.safetensors")
