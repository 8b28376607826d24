"""Tiny random dense models of every supported family, and helpers, for the conversion tests."""

import torch
import transformers
from torch import nn

from moekit import FFN, MoE, Routing
from moekit.convert import ConvertedFFN
from moekit.models import GPT, GPTConfig

VOCAB = 100

HF_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)

FAMILIES = ["gpt", "llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"]

D_FF = {"gpt": 64, "llama": 64, "mistral": 64, "qwen2": 64, "qwen3": 64, "gpt2": 128, "bert": 64}

CAUSAL = {"gpt", "llama", "mistral", "qwen2", "qwen3", "gpt2"}

def _dense(family: str) -> nn.Module:
    """A tiny random dense model of ``family`` (eval mode), the same one for the same family."""
    torch.manual_seed(0)
    T = transformers
    if family == "gpt":
        m = GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=64))
    elif family == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**HF_SMALL))
    elif family == "mistral":
        m = T.MistralForCausalLM(T.MistralConfig(**HF_SMALL))
    elif family == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**HF_SMALL))
    elif family == "qwen3":
        m = T.Qwen3ForCausalLM(T.Qwen3Config(**HF_SMALL, head_dim=8))
    elif family == "gpt2":  # d_ff = 4 * n_embd = 128, Conv1D layers with biases, gelu_new
        m = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    elif family == "bert":  # biases, FFN split over intermediate.dense and output.dense
        m = T.BertModel(T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB, pad_token_id=0))
    else:
        raise KeyError(family)
    return m.eval()

def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (causal LMs) or the last hidden state (BERT)."""
    return model(ids) if isinstance(model, GPT) else model(input_ids=ids)[0]

def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = _out(model, ids).float()
    if isinstance(model, transformers.BertModel):
        return out.pow(2).mean()
    return nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))

def _ids(B: int = 2, T: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))

def _moes(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]

def _every_expert_on(moe: MoE):
    """A forward that ignores the router: every (token, expert) pair at weight 1."""
    orig = moe.forward

    def forward(x, routing=None, **context):
        T, E = x.reshape(-1, x.shape[-1]).shape[0], moe.num_experts
        every = Routing(torch.arange(T).repeat_interleave(E), torch.arange(E).repeat(T),
                        torch.ones(T * E, dtype=x.dtype), T, E)
        return orig(x, routing=every)

    return forward

def _force_all_on(model: nn.Module, monkeypatch) -> None:
    moes = _moes(model)
    assert moes
    for moe in moes:
        monkeypatch.setattr(moe, "forward", _every_expert_on(moe))

def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())

def _hidden_widths(model: nn.Module) -> list[int]:
    """The hidden width of every (converted) FFN of the model, in layer order."""
    mods = [b.ffn for b in model.blocks] if isinstance(model, GPT) else \
        [m.ffn for m in model.modules() if isinstance(m, ConvertedFFN)]
    assert all(isinstance(m, FFN) for m in mods)
    return [m.up_proj.out_features for m in mods]

def _calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (16, 40), generator=torch.Generator().manual_seed(2))

def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

D, DFF, V = 16, 32, 50

def _gpt(seed=0, n_layers=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, d_model=D, n_layers=n_layers, n_heads=2, max_seq_len=16, d_ff=DFF)).eval()

def _every(T, E, dtype=torch.float32):
    return Routing(torch.arange(T).repeat_interleave(E), torch.arange(E).repeat(T), torch.ones(T * E, dtype=dtype), T, E)

def _hidden(ffn: FFN, x):
    """silu(x Wg^T) * (x Wu^T) in float64, from the dense FFN's weights."""
    x = x.double()
    g = x @ ffn.gate_proj.weight.detach().double().T
    u = x @ ffn.up_proj.weight.detach().double().T
    return g * torch.sigmoid(g) * u

def _expert_slices(moe: MoE, e: int):
    f = moe.experts.d_ff
    w1 = moe.experts.gate_up_proj[e]
    return w1[:f], w1[f:], moe.experts.down_proj[e]  # gate rows, up rows, down columns

def _gpt_calibration(n=48, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, 16), generator=g)

def _mean_abs_hidden(dense: GPT, ids) -> list:
    """Per layer: mean over every calibration token of |silu(x Wg) * x Wu| per hidden channel, from the
    FFN's input (captured with a pre-hook) and the dense weights."""
    inputs = {i: [] for i in range(len(dense.blocks))}
    hooks = [b.ffn.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, D)))
             for i, b in enumerate(dense.blocks)]
    with torch.no_grad():
        dense(ids)
    for h in hooks:
        h.remove()
    return [_hidden(b.ffn, torch.cat(inputs[i])).abs().mean(0) for i, b in enumerate(dense.blocks)]

def _spread(model: nn.Module, std: float = 0.3, seed: int = 3) -> nn.Module:
    """Re-draw every weight: matrices from N(0, std), vectors (norms, biases) from 1 + N(0, 0.1), so that
    a wrong mapping (a permuted head, a missing bias, a different routing) shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            p.copy_(noise * std if p.dim() >= 2 else 1 + 0.1 * noise)
    return model

def _tokenizer(cache_dir):
    """A tiny byte-level BPE ``tokenizers.Tokenizer`` (moekit's own kind, ``<|endoftext|>`` at 0)."""
    from moekit.data import train_tokenizer

    words = ["alpha beta gamma delta", "uno dos tres cuatro", "mixture of experts routes tokens"]
    tok, _ = train_tokenizer([w for w in words for _ in range(30)], vocab_size=280, cache_dir=cache_dir)
    return tok
