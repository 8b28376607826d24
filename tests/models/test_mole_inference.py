"""moekit.models.mole.inference: the inference form's fast path, and load_served from a checkpoint and a table."""

import pytest
import torch

from moekit.models.mole import load_served, reparameterize
from tests.models.test_mole import _model


def test_inference_fast_path_equals_plain_path_and_follows_weight_changes(tmp_path):
    """Without autograd the router rides in the shared FFN's up projection; same logits, and a weight
    changed in place (an optimizer step, load_state_dict) is picked up."""
    model = _model()
    inf = reparameterize(model, tmp_path / "t", dtype=torch.float32, progress=False).eval()
    ids = torch.randint(0, 300, (2, 9))
    plain = inf(ids)  # grad enabled: the plain path
    with torch.no_grad():
        torch.testing.assert_close(inf(ids), plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inf(ids[:1, :1]), inf(ids)[:1, :1], atol=1e-5, rtol=1e-5)  # T=1 path
        ffn = inf.blocks[1].ffn
        ffn.router.weight.mul_(-3.0)
        ffn.shared.up_proj.weight.add_(0.1)
        fast = inf(ids)
    torch.testing.assert_close(fast, inf(ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, plain, atol=1e-3)


def test_load_served_from_checkpoint_and_table(tmp_path):
    model = _model()
    model.save(tmp_path / "ckpt")
    served = reparameterize(model, tmp_path / "table", progress=False).eval()
    loaded = load_served(tmp_path / "ckpt", tmp_path / "table")
    ids = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(loaded(ids), served(ids))
    assert not any("experts." in n for n in loaded.state_dict())
    other = _model(seed=1)
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match="built for other weights"):
        load_served(tmp_path / "other", tmp_path / "table")


def test_load_served_keeps_embeddings_tied(tmp_path):
    model = _model()
    model.save(tmp_path / "ckpt")
    reparameterize(model, tmp_path / "table", progress=False)
    loaded = load_served(tmp_path / "ckpt", tmp_path / "table")
    assert loaded.head.weight is loaded.embed.weight
