"""`moekit generate` on every model kind moekit loads (tiny models): the text it prints is the
continuation that ``moekit.generate`` computes for the model that was saved."""

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import moekit
from moekit.apps.cli.generate import _eos
from moekit.apps.cli.main import main
from moekit.convert import partition
from moekit.convert import save as save_converted
from moekit.models import GPT, GPTConfig
from moekit.models.mole import reparameterize
from moekit.ops.sampling import Sampling

VOCAB = 64
EOS = "<|endoftext|>"
HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=VOCAB, bos_token_id=1, eos_token_id=0, pad_token_id=0, max_position_embeddings=64)
PROMPT = "w5 w9 w2 w30"


def _tokenizer() -> Tokenizer:
    words = [EOS, "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([EOS, "<unk>"])
    return tok


def _hf_tokenizer(folder):
    transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), eos_token=EOS, unk_token="<unk>",
                                         pad_token=EOS).save_pretrained(folder)


def _gpt(ffn=None) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=64, ffn=ffn)).eval()


def _expected(model, n=6, sampling=None, eos=(0,), seed=None) -> str:
    tok = _tokenizer()
    ids = torch.tensor([tok.encode(PROMPT).ids])
    out = moekit.generate(model, ids, n, sampling, list(eos), seed)
    return PROMPT + tok.decode(out[0, ids.shape[1]:].tolist())


def _run(capsys, folder, *extra) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6",
                 "--device", "cpu", *extra]) == 0
    out = capsys.readouterr()
    return out.out.rstrip("\n"), out.err


def _mole(tmp_path):
    model = _gpt([{"kind": "mole", "num_experts": 4, "d_ff": 48}] * 2)
    model.save(tmp_path / "run" / "model", files={"tokenizer.json": _tokenizer().to_str()})
    reparameterize(model, tmp_path / "run" / "mole_table", dtype=torch.float32, progress=False)
    return model, tmp_path / "run" / "model"


def _gpt_folder(tmp_path):
    model = _gpt(GPTConfig(vocab_size=VOCAB, n_layers=2, d_ff=128).with_moe(4, 2).ffn)
    model.save(tmp_path / "gpt", files={"tokenizer.json": _tokenizer().to_str()})
    return model, tmp_path / "gpt"


def _converted(tmp_path):
    torch.manual_seed(0)
    model = partition(transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).eval(), 4).eval()
    save_converted(model, tmp_path / "conv")
    _hf_tokenizer(tmp_path / "conv")
    return model, tmp_path / "conv"


def _llama(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).eval()
    model.save_pretrained(tmp_path / "llama")
    _hf_tokenizer(tmp_path / "llama")
    return model, tmp_path / "llama"


def _mixtral(tmp_path):
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**HF, num_local_experts=4)).eval()
    model.save_pretrained(tmp_path / "mixtral")
    _hf_tokenizer(tmp_path / "mixtral")
    return model, tmp_path / "mixtral"


KINDS = {"gpt": _gpt_folder, "mole": _mole, "converted": _converted, "hf-dense": _llama, "hf-moe": _mixtral}


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_every_model_kind(kind, tmp_path, capsys):
    model, folder = KINDS[kind](tmp_path)
    out, err = _run(capsys, folder)
    assert out == _expected(model)
    assert {"gpt": "moekit GPT", "mole": "experts read from the table", "converted": "converted model",
            "hf-dense": "Hugging Face LlamaForCausalLM", "hf-moe": "Hugging Face MixtralForCausalLM"}[kind] in err
    sampled, _ = _run(capsys, folder, "--temperature", "0.8", "--top-k", "8", "--top-p", "0.9", "--seed", "4")
    assert sampled == _expected(model, sampling=Sampling(0.8, 8, 0.9), seed=4)


def test_eos_options(tmp_path, capsys):
    model, folder = _gpt_folder(tmp_path)
    free = _expected(model, eos=())
    first = free.split()[4]  # the first new token
    stopped = _expected(model, eos=(_tokenizer().token_to_id(first),))
    assert stopped == PROMPT + first and free != stopped
    assert _run(capsys, folder, "--eos", "none")[0] == free
    assert _run(capsys, folder, "--eos", first)[0] == stopped
    assert _run(capsys, folder, "--eos", f"{_tokenizer().token_to_id(first)},{EOS}")[0] == stopped


def test_offload_serves_a_hugging_face_moe_from_a_new_store(tmp_path, capsys):
    model, folder = _mixtral(tmp_path)
    want = _expected(model)
    before = sorted(p.name for p in folder.iterdir())
    out, err = _run(capsys, folder, "--offload", "--store", str(tmp_path / "store"), "--budget", "50%")
    assert out == want and "hit rate" in err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written into the user's folder
    assert _run(capsys, folder, "--offload", "--store", str(tmp_path / "store"))[0] == want  # reused


@pytest.mark.parametrize("extra, msg", [
    (["--offload"], "give --store"),
    (["--store", "s"], "apply to --offload serving"),
    (["--eos", "nope"], "--eos 'nope': not a token"),
])
def test_refusals_are_one_line(tmp_path, capsys, extra, msg):
    _, folder = _mixtral(tmp_path)
    assert main(["generate", "--model", str(folder), "--prompt", PROMPT, "--device", "cpu", *extra]) != 0
    assert msg in capsys.readouterr().err


def test_eos_values_parse_to_token_ids():
    class Tok:
        eos = [0]

        def token_id(self, text):
            return {"w3": 5}.get(text)

    assert _eos(None, Tok()) == [0] and _eos("none", Tok()) == [] and _eos("NONE", Tok()) == []
    assert _eos("w3, 7", Tok()) == [5, 7]
    with pytest.raises(ValueError, match="'w99': not a token"):
        _eos("w99", Tok())
