"""`moekit train --config`: the TOML file's keys, refusals, and the resolved file read back to the same values."""

import pytest

from moekit.apps.cli.run_config import MODEL_KEYS, TRAIN_KEYS, read_run_config, run_config_toml
from moekit.train.trainer import TrainConfig


def _write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_keys_map_to_flag_names(tmp_path):
    p = _write(tmp_path, 'data = "corpus.txt"\n[model]\nffn = "moe"\nexperts = 4\n'
                         'router_args = { k = 1, temperature = 0.5 }\ntie_embeddings = false\n'
                         '[train]\nwarmup_steps = 7\nweight_decay = 0.05\nminutes = 1.5\ndevice = "cpu"\n')
    assert read_run_config(p) == {"data": "corpus.txt", "device": "cpu", "ffn": "moe", "experts": 4,
                                  "router_args": {"k": 1, "temperature": 0.5}, "tie_embeddings": False,
                                  "warmup": 7, "weight_decay": 0.05, "minutes": 1.5}


def test_every_train_config_field_is_a_key():
    assert set(TRAIN_KEYS) == set(TrainConfig.__dataclass_fields__)
    assert {"d_model", "layers", "heads", "d_ff", "vocab", "experts", "k", "router", "ffn"} <= set(MODEL_KEYS)


def test_resolved_file_reads_back_to_the_same_settings(tmp_path):
    settings = {"data": 'C:\\my "corpus".txt', "ffn": "moe", "experts": 8, "k": 2, "router": "topk",
                "router_args": {"k": 2}, "d_model": 64, "norm_eps": 1e-6, "tie_embeddings": True, "steps": 10,
                "warmup": 3, "lr": 0.003, "minutes": None, "beta2": 0.95, "device": "auto"}
    text = run_config_toml(settings)
    assert "minutes" not in text and "warmup_steps = 3" in text
    assert read_run_config(_write(tmp_path, text)) == {k: v for k, v in settings.items() if v is not None}


@pytest.mark.parametrize("text, msg", [
    ("[model]\nexpert = 4\n", r"\[model\]: unknown key\(s\) \['expert'\]; valid keys are"),
    ("[training]\nsteps = 4\n", r"unknown key\(s\) \['training'\]"),
    ("[train]\nwarmup = 4\n", r"\[train\]: unknown key\(s\) \['warmup'\]"),
    ("[model\nffn = 1\n", "not a readable TOML file"),
])
def test_bad_files_are_refused_naming_the_key(tmp_path, text, msg):
    with pytest.raises(ValueError, match=msg):
        read_run_config(_write(tmp_path, text))


def test_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_run_config(tmp_path / "nope.toml")
