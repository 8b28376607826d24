"""One flipped byte or a truncation in any file moekit writes is an error on load that names the
file (never different outputs): models, converted models, MoLE tables, expert stores, traces,
tokenizers kept with a run, run and demo manifests. Checkpoints: tests/train/test_checkpoint.py."""

import json

import pytest
import torch

from moekit.convert import partition
from moekit.convert.saving import load, save
from moekit.data import load_tokenizer, train_tokenizer
from moekit.io import MoekitWarning
from moekit.models import GPT, GPTConfig
from moekit.models.mole import LookupTable, reparameterize
from moekit.offload import ExpertStore, Trace, record_trace, write_store
from tests.faults import flip_byte, resign, truncate

CFG = GPTConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, d_ff=64)


def _gpt(folder):
    torch.manual_seed(0)
    GPT(CFG.with_moe(4, 2)).save(folder)
    return lambda: GPT.load(folder)


def _converted(folder):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    save(partition(transformers.LlamaForCausalLM(cfg), 4), folder)
    return lambda: load(folder)


def _mole(folder):
    torch.manual_seed(0)
    model = GPT(CFG.__class__(**{**CFG.to_dict(), "ffn": [{"kind": "mole", "num_experts": 2, "d_ff": 64}] * 2}))
    served = reparameterize(model, folder, progress=False)

    def use():
        table = LookupTable(folder)
        table._rows(list(range(CFG.vocab_size)))  # every record read once: each is checked
        return served

    return use


def _store(folder):
    torch.manual_seed(0)
    write_store(GPT(CFG.with_moe(4, 2)), folder)

    def use():
        s = ExpertStore(folder)
        for layer, spec in enumerate(s.layers):
            for e in range(spec.num_experts):
                s.read(layer, e, torch.empty(spec.numel))

    return use


def _trace(folder):
    torch.manual_seed(0)
    folder.mkdir()
    record_trace(GPT(CFG.with_moe(4, 2)), torch.randint(0, 96, (2, 8))).save(folder / "trace.safetensors")
    return lambda: Trace.load(folder / "trace.safetensors")


KINDS = {
    "model": (_gpt, ["model.safetensors", "config.json", "moekit.json"]),
    "converted": (_converted, ["model.safetensors", "config.json", "moekit_convert.json", "moekit.json"]),
    "mole-table": (_mole, ["table.bin", "table.crc32", "manifest.json", "moekit.json"]),
    "expert-store": (_store, ["layer_000.safetensors", "layer_001.safetensors", "manifest.json", "moekit.json"]),
    "trace": (_trace, ["trace.safetensors"]),
}
CASES = [(kind, f, damage) for kind, (_, files) in KINDS.items() for f in files for damage in ("flip", "truncate")]


@pytest.mark.parametrize("kind,file,damage", CASES)
def test_damage_to_any_file_is_an_error_naming_it(tmp_path, kind, file, damage):
    build, _ = KINDS[kind]
    folder = tmp_path / kind
    use = build(folder)
    use()  # intact: loads
    path = folder / file
    if damage == "flip":
        flip_byte(path, path.stat().st_size // 2 if not file.endswith(".json") else 2)
    else:
        truncate(path, 0.9)
    with pytest.raises(ValueError) as e:
        use()
    name = "moekit.json" if file == "moekit.json" else file
    assert name in str(e.value) and ("\n" not in str(e.value)), str(e.value)


def test_a_table_record_is_checked_when_it_is_read(tmp_path):
    """A flipped byte inside one token's record is found by that record's CRC-32, even behind a
    re-signed manifest (as if the file had rotted after the folder was checked)."""
    use = _mole(tmp_path / "t")
    use()
    table_file = tmp_path / "t" / "table.bin"
    record = LookupTable(tmp_path / "t").bytes_per_token
    flip_byte(table_file, 7 * record + 5)  # token 7
    resign(tmp_path / "t")
    table = LookupTable(tmp_path / "t")
    table._rows([1, 2, 3])  # other tokens read fine
    with pytest.raises(ValueError, match=r"table.bin: the record of token 7 does not match its checksum"):
        table._rows([6, 7])
    table.verify = False  # the check can be switched off (benchmarks of its cost)
    table._rows([6, 7])


def test_a_damaged_tokenizer_is_named_and_a_damaged_cache_entry_retrained(tmp_path):
    tok, hit = train_tokenizer(["the cat sat on the mat " * 30], 280, cache_dir=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert train_tokenizer(["the cat sat on the mat " * 30], 280, cache_dir=tmp_path)[1]  # a hit
    truncate(entry / "tokenizer.json")
    with pytest.warns(MoekitWarning, match="tokenizer cache .*training it again"):
        again, hit = train_tokenizer(["the cat sat on the mat " * 30], 280, cache_dir=tmp_path)
    assert not hit and again.to_str() == tok.to_str()
    with pytest.raises(ValueError, match=r"tokenizer.json: not a readable tokenizer.json"):
        bad = tmp_path / "user" / "tokenizer.json"  # a user's file: no checksum, but a clear error
        bad.parent.mkdir()
        bad.write_text('{"version": "1.0", "trunc')
        load_tokenizer(bad)


def test_a_tokenizer_kept_with_a_run_is_checked_wherever_it_is_loaded(tmp_path):
    from tests.trainrun import trainer

    t = trainer(tmp_path / "run", steps=1)
    tok, _ = train_tokenizer(["the cat sat on the mat " * 30], 280, cache_dir=tmp_path / "cache")
    t.files = {"tokenizer.json": tok.to_str()}
    t.train()
    assert load_tokenizer(tmp_path / "run").to_str() == tok.to_str()
    flip_byte(tmp_path / "run" / "tokenizer.json", 40)
    with pytest.raises(ValueError, match=r"run/tokenizer.json: checksum mismatch"):
        load_tokenizer(tmp_path / "run" / "tokenizer.json")


def test_a_corrupt_run_manifest_is_named(tmp_path):
    from tests.trainrun import trainer

    trainer(tmp_path / "run", steps=2).train()
    (tmp_path / "run" / "moekit.json").write_text(json.dumps({"format": "moekit"})[:-3])
    with pytest.raises(ValueError, match=r"run/moekit.json: not valid JSON"):
        trainer(tmp_path / "run", steps=2).train(resume=True)


def test_a_damaged_model_is_not_served_from_disk(tmp_path):
    from moekit.offload import load_offloaded

    _gpt(tmp_path / "m")
    load_offloaded(tmp_path / "m")[1].close()
    flip_byte(tmp_path / "m" / "model.safetensors", -5)  # a dense tensor: the experts are in the store
    with pytest.raises(ValueError, match=r"m/model.safetensors: checksum mismatch"):
        load_offloaded(tmp_path / "m")
