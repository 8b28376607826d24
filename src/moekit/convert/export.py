"""How a converted model leaves moekit: as a Hugging Face-native folder, or in moekit's own format.

**HF-native** (:func:`export_hf`). A model whose every FFN slot has an exact transformers
counterpart is written as that architecture (:data:`TARGETS`): the target's ``config.json`` (its
``model_type`` and ``architectures``), ``model.safetensors`` in its parameter names, the
tokenizer's files, and moekit's record ``moekit_convert.json`` and checksums ``moekit.json``,
which transformers ignores. Plain ``transformers.AutoModelForCausalLM.from_pretrained`` then
computes the same logits. The routers must be plain top-k softmax (``TopK`` without ``scale`` or
capacity); Mixtral renormalises the k weights, Qwen2-/Qwen3-MoE follow ``norm_topk_prob``.
Qwen2-MoE always has a sigmoid-gated shared expert: a layer without one gets one with zero weights
(its output is exactly 0); a shared expert without a gate gets gate weights 0 (sigmoid 1/2) and
its down projection times 2 (both exact in floating point). moekit's GPT becomes Llama (every
layer dense) or Mixtral (every layer top-k MoE): its fused ``qkv`` is split into ``q_proj`` /
``k_proj`` / ``v_proj`` and its interleaved rotary pairs are permuted into Hugging Face's
half-split layout. The load-balancing coefficient becomes ``router_aux_loss_coef = balance / k``
(the scale :func:`moekit.convert.patch_hf_model` undoes); ``balance``, ``z_loss`` and ``jitter``
(training only) are kept in the record for :func:`moekit.convert.load`.

**moekit format** (every other conversion: SigmoidSTE, PreGate, DSelect-k, ...): the base model's
config moves into ``moekit_convert.json`` (FORMAT 2) and ``config.json`` holds
``model_type: "moekit"`` and a ``vocab_size`` that is a sentence, so that transformers'
``from_pretrained`` (``Auto*`` and the base class alike) fails instead of building a dense model
around weights it cannot place.

**Hugging Face MoEs with moekit layers** (Mixtral, Qwen2-/Qwen3-MoE, OLMoE whose MoE blocks were
patched into ``moekit.MoE``, perhaps compressed by :mod:`moekit.compress`): HF-native, as their own
architecture, when every layer still has the shape of the block the config builds (pruned to the
same ``E'`` everywhere); in moekit's format otherwise (merged behind a ``grouped`` router, quantized
experts, different expert counts per layer), the same FORMAT 2 with ``moe_layers`` in place of the
converted ``layers``: each patched layer's spec (:func:`moekit.compress.surgery.layer_spec`) by
module name, rebuilt in place of the blocks of the base model.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.compress.surgery import layer_spec
from moekit.convert.build import ConvertedFFN
from moekit.convert.ffn import family_of
from moekit.convert.hf import check_block
from moekit.data import load_tokenizer
from moekit.data.tokenizer import EOS
from moekit.io import MANIFEST, FolderWriter, verify_file, write_folder
from moekit.layer import FFN, MoE
from moekit.models import GPT
from moekit.models.gpt import MODEL_KIND
from moekit.routers import TopK

__all__ = ["Target", "TARGETS", "export_hf", "hf_native", "why_not_hf_native", "save_converted", "tokenizer_files",
           "bind_save_pretrained", "SavePretrained", "patched_layers", "router_training", "restore_router_training", "check_format", "CONVERT_FILE",
           "WEIGHTS", "FORMAT", "READS", "FORMATS"]

CONVERT_FILE = "moekit_convert.json"
WEIGHTS = "model.safetensors"
FORMAT = 2  # 2: the base config in CONVERT_FILE, config.json refuses transformers; 1: the base config.json
READS = (1, 2)
FORMATS = ("auto", "moekit", "hf")
NOT_TRANSFORMERS = ("not a transformers model: a model converted or compressed by moekit, in moekit's format (moekit_convert.json); "
                    "load it with moekit.convert.load")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
_OWN_FILES = ("config.json", WEIGHTS, CONVERT_FILE, MANIFEST)
_TRAINING = ("balance", "z_loss", "jitter")  # router settings that act only in training
_GPT_ACT = {"swiglu": "silu", "geglu": "gelu"}  # moekit gated activation -> Hugging Face hidden_act


class _NotNative(ValueError):
    """What keeps a model from an exact transformers architecture (one clause, no advice)."""


# ----------------------------------------------------------------------------------- the targets


def _to_mixtral(cfg: dict) -> dict:
    if cfg.pop("attention_bias", False):
        raise _NotNative("attention biases (attention_bias=True; Mixtral's attention has none)")
    if cfg.pop("mlp_bias", False):
        raise _NotNative("MLP biases (mlp_bias=True; Mixtral's experts have none)")
    cfg.pop("pretraining_tp", None)  # not read by transformers 5
    return cfg


def _to_qwen2_moe(cfg: dict) -> dict:
    return {**cfg, "qkv_bias": True}  # Qwen2's q/k/v projections always have biases


def _to_qwen3_moe(cfg: dict) -> dict:
    types = cfg.pop("layer_types", None) or []
    cfg.pop("max_window_layers", None)
    if set(types) - {"full_attention", "sliding_attention"}:
        raise _NotNative(f"attention layer types {sorted(set(types))} (Qwen3-MoE has full or sliding attention)")
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and not all(sliding):
        raise _NotNative("sliding-window attention in some layers only (Qwen3-MoE slides in every layer or none)")
    return {**cfg, "use_sliding_window": bool(sliding) and all(sliding)}


@dataclass(frozen=True)
class Target:
    """A transformers architecture a model can be written as, and how its config describes the FFNs."""

    cls: str  # the model class, e.g. "MixtralForCausalLM"
    config_cls: str  # its config class
    sources: tuple[str, ...]  # the moekit families written as it (moekit.convert.ffn names)
    moe: bool = True  # MoE blocks (False: every layer dense)
    mixed: bool = False  # dense layers may stand among MoE ones (``mlp_only_layers``)
    shared: bool = False  # every MoE block has a sigmoid-gated shared expert
    renormalize: bool | None = True  # the k routing weights renormalised always (True) or per norm_topk_prob (None)
    experts: str = "num_local_experts"  # config field: experts per block
    width: str = "intermediate_size"  # config field: an expert's hidden width
    adapt: Callable[[dict], dict] = dict  # the base config's entries -> the target's (raises what does not map)


#: every architecture moekit writes, by transformers ``model_type``
TARGETS: dict[str, Target] = {
    "llama": Target("LlamaForCausalLM", "LlamaConfig", ("moekit-gpt",), moe=False),
    "mixtral": Target("MixtralForCausalLM", "MixtralConfig", ("llama", "mistral", "moekit-gpt"), adapt=_to_mixtral),
    "qwen2_moe": Target("Qwen2MoeForCausalLM", "Qwen2MoeConfig", ("qwen2",), mixed=True, shared=True,
                        renormalize=None, experts="num_experts", width="moe_intermediate_size", adapt=_to_qwen2_moe),
    "qwen3_moe": Target("Qwen3MoeForCausalLM", "Qwen3MoeConfig", ("qwen3",), mixed=True, renormalize=None,
                        experts="num_experts", width="moe_intermediate_size", adapt=_to_qwen3_moe),
}


# ----------------------------------------------------------------------------------- what maps


def _layer(module: nn.Module, i: int) -> nn.Module:
    """The moekit layer (``MoE`` or ``FFN``) in FFN slot ``i``, unwrapped from ``ConvertedFFN``."""
    if isinstance(module, ConvertedFFN):
        if module.context is not None:
            raise _NotNative(f"layer {i} is routed by a PreGate (Read-ME's refactor)")
        if module.out_bias is not None:
            raise _NotNative(f"layer {i} has a down-projection bias")
        module = module.ffn
    if isinstance(module, FFN):
        if not module.act.gated or module.up_proj.bias is not None:
            raise _NotNative(f"layer {i} is a dense FFN with {'biases' if module.act.gated else 'a plain activation'}")
        return module
    if not isinstance(module, MoE):
        raise _NotNative(f"layer {i} is a {type(module).__name__}")
    if module.num_zc_experts:
        raise _NotNative(f"layer {i} has zero-computation experts (MoE++)")
    return module


def _check_moe(moe: MoE, i: int, target: Target) -> None:
    r = moe.gate
    if type(r) is not TopK:
        raise _NotNative(f"layer {i} routes with {type(r).__name__} (only top-k softmax routing, moekit's TopK, maps)")
    if r.scale != 1.0 or r.capacity_factor is not None:
        what = f"scale={r.scale}" if r.scale != 1.0 else f"capacity_factor={r.capacity_factor}"
        raise _NotNative(f"layer {i} routes with TopK({what}) (transformers' blocks neither scale nor drop)")
    if target.renormalize is not None and r.renormalize != target.renormalize:
        raise _NotNative(f"layer {i} routes with TopK(renormalize={r.renormalize}) ({target.cls} always "
                         f"{'renormalises' if target.renormalize else 'keeps'} the k routing weights)")
    if moe.experts.down_proj_bias is not None or not moe.experts.act.gated:
        raise _NotNative(f"layer {i} has experts with {'biases' if moe.experts.act.gated else 'a plain activation'}")
    s = moe.shared_expert
    if s is not None and not target.shared:
        raise _NotNative(f"layer {i} has a shared expert ({target.cls} has none)")
    if s is not None and (s.activation != moe.experts.activation or s.up_proj.bias is not None):
        raise _NotNative(f"layer {i} has a shared expert unlike its experts (activation or biases)")


def _one(values: list, what: str):
    """The value every layer shares (a layer-dependent value does not map)."""
    if len(set(values)) != 1:
        raise _NotNative(f"the layers differ in {what} ({values})")
    return values[0]


def _ffn_fields(layers: list[nn.Module], target: Target) -> dict:
    """The target config's entries that describe the FFNs, after checking every layer maps."""
    moes = [(i, m) for i, m in enumerate(layers) if isinstance(m, MoE)]
    dense = [(i, m) for i, m in enumerate(layers) if isinstance(m, FFN)]
    if not target.moe:
        if moes:
            raise _NotNative(f"MoE layers {[i for i, _ in moes]} ({target.cls} is dense)")
        return {"intermediate_size": _one([m.up_proj.out_features for _, m in dense], "dense FFN width")}
    if not moes:
        raise _NotNative("no MoE layer")
    if dense and not target.mixed:
        raise _NotNative(f"dense layers {[i for i, _ in dense]} among MoE ones ({target.cls} has an MoE block in "
                         "every layer)")
    for i, m in moes:
        _check_moe(m, i, target)
    k = _one([m.gate.k for _, m in moes], "k")
    out = {target.experts: _one([m.num_experts for _, m in moes], "number of experts"),
           target.width: _one([m.d_ff for _, m in moes], "expert width"), "num_experts_per_tok": k,
           "router_aux_loss_coef": moes[0][1].gate.balance / k,  # transformers' one coefficient
           "output_router_logits": False}
    if target.renormalize is None:
        out["norm_topk_prob"] = _one([m.gate.renormalize for _, m in moes], "renormalize")
    if target.mixed:
        out |= {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, _ in dense]}
        if dense:
            out["intermediate_size"] = _one([m.up_proj.out_features for _, m in dense], "dense FFN width")
    if target.shared:
        out["shared_expert_intermediate_size"] = _shared_width(m for _, m in moes)
    return out


def _shared_width(moes) -> int:
    """The shared-expert width of a target whose every block has one: the widest (1 when none has one)."""
    return max([m.shared_expert.down_proj.in_features for m in moes if m.shared_expert is not None], default=1)


# ----------------------------------------------------------------------------------- configs


def _config(target: Target, base: dict, fields: dict):
    """The target's transformers config from the base model's entries and the FFN ``fields``."""
    import transformers

    entries = target.adapt({k: v for k, v in base.items() if k not in ("model_type", "architectures")})
    cls = getattr(transformers, target.config_cls)
    config = cls.from_dict({**entries, **fields, "architectures": [target.cls]})
    for k, v in fields.items():
        if getattr(config, k, None) != v:
            raise _NotNative(f"transformers {transformers.__version__}: {target.config_cls} does not take {k}={v!r}")
    return config


def _gpt_base(model: GPT, layers: list[nn.Module]) -> dict:
    """A Llama config's entries for moekit's GPT (the FFN entries come from :func:`_ffn_fields`)."""
    c = model.config
    if model.pregate is not None:
        raise _NotNative("a PreGate (Read-ME's pre-gating router)")
    acts = [m.activation if isinstance(m, FFN) else m.experts.activation for m in layers]
    act = _one(acts, "activation")
    if act not in _GPT_ACT:
        raise _NotNative(f"activation {act!r} (Hugging Face gated FFNs take {sorted(_GPT_ACT)})")
    return {"vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_heads, "head_dim": c.d_model // c.n_heads,
            "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": _GPT_ACT[act],
            "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
            "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
            "dtype": str(model.embed.weight.dtype).removeprefix("torch.")}


def _hf_base(model: nn.Module) -> dict:
    base = json.loads(model.config.to_json_string(use_diff=False))
    base["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return base


# ----------------------------------------------------------------------------------- plans


@dataclass
class _Plan:
    """What :func:`export_hf` writes: the target, its config, the tensors (built when written), the record."""

    target: Target
    config: object
    tensors: Callable[[], dict[str, Tensor]]
    record: dict


def _record(model: nn.Module, target: Target, extra: dict) -> dict:
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    return {"format": FORMAT, "native": target.cls, "class": type(model).__name__, **extra,
            "router_training": [router_training(m) for m in moes]}


def _gpt_plan(model: GPT) -> _Plan:
    for i, b in enumerate(model.blocks):
        if type(b.attn.qkv) is not nn.Linear or type(b.attn.proj) is not nn.Linear:
            raise _NotNative(f"layer {i}'s attention projections are packed ({type(b.attn.qkv).__name__}; "
                             "MC-MoE's attention_bits)")
    layers = [_layer(b.ffn, i) for i, b in enumerate(model.blocks)]
    target = TARGETS["mixtral"] if any(isinstance(m, MoE) for m in layers) else TARGETS["llama"]
    config = _config(target, _gpt_base(model, layers), _ffn_fields(layers, target))
    extra = {"family": "moekit-gpt", "gpt_config": model.config.to_dict()}
    return _Plan(target, config, lambda: _gpt_tensors(model, layers), _record(model, target, extra))


def _converted_plan(model: nn.Module) -> _Plan:
    family = family_of(model).name
    target = next((t for t in TARGETS.values() if t.moe and family in t.sources), None)
    if target is None:
        raise _NotNative(f"{family} models have no MoE architecture in transformers that moekit writes "
                         f"(it writes {sorted(f for t in TARGETS.values() for f in t.sources)})")
    if not type(model).__name__.endswith("ForCausalLM"):
        raise _NotNative(f"a {type(model).__name__} (moekit writes causal LMs: convert the *ForCausalLM model)")
    slots = [name for name, m in model.named_modules() if isinstance(m, ConvertedFFN)]
    layers = [_layer(model.get_submodule(name), i) for i, name in enumerate(slots)]
    fields = _ffn_fields(layers, target)
    config = _config(target, _hf_base(model), fields)
    width = fields.get("shared_expert_intermediate_size")
    return _Plan(target, config, lambda: _converted_tensors(model, slots, layers, width),
                 _record(model, target, model.moekit_convert))


def patched_layers(model: nn.Module) -> dict[str, MoE]:
    """The ``moekit.MoE`` layers of a transformers model that stand where its MoE blocks stood
    (:func:`moekit.convert.patch_hf_model`, then perhaps compressed), by module name."""
    if not type(model).__module__.startswith("transformers."):
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, MoE) and getattr(m, "hf_block_class", None)}


def _loaded_plan(model: nn.Module) -> _Plan:
    """A transformers model whose MoE blocks are ``moekit.MoE`` layers (loaded from a Hugging Face
    folder, perhaps pruned): written as it is when every layer has the shape of the block its config
    builds (same experts, top-k, renormalisation, shared expert; plain weights)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    target = TARGETS.get(model.config.model_type)
    if target is None or target.cls != type(model).__name__:
        target = Target(type(model).__name__, type(model.config).__name__, ())
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            if getattr(m, "hf_block_class", None) is None:
                raise _NotNative(f"{name} is a moekit MoE that no {target.cls} block was patched into")
            with torch.device("meta"):
                like = m.hf_block_class(cfg)
            try:
                check_block(m, like, name)
            except ValueError as e:
                raise _NotNative(str(e)) from None
    return _Plan(target, model.config, model.state_dict, _record(model, target, getattr(model, "moekit_convert", None) or {}))


def _plan(model: nn.Module) -> _Plan:
    if isinstance(model, GPT):
        return _gpt_plan(model)
    converted = getattr(model, "moekit_convert", None) is not None
    if not converted and not patched_layers(model):
        raise _NotNative(f"{type(model).__name__} was not converted by moekit.convert")
    if converted and any(isinstance(m, ConvertedFFN) for m in model.modules()):
        return _converted_plan(model)
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if patched_layers(model) or mt in TARGETS and type(model).__name__ == TARGETS[mt].cls:
        return _loaded_plan(model)
    raise _NotNative(f"{type(model).__name__} has no converted layer")


# ----------------------------------------------------------------------------------- tensors


def _shared_tensors(moe: MoE, width: int) -> dict[str, Tensor]:
    """Qwen2-MoE's gated shared expert of ``width`` channels computing exactly what ``moe``'s shared
    expert does: zero-padded channels, gate weights 0 and the down projection doubled when it has no
    gate, all zero (an output of exactly 0) when it has no shared expert."""
    D, like = moe.d_model, moe.experts.down_proj
    gate, up, down = (like.new_zeros(width, D), like.new_zeros(width, D), like.new_zeros(D, width))
    gate_w = like.new_zeros(1, D)
    s = moe.shared_expert
    if s is not None:
        f = s.down_proj.in_features
        gate[:f], up[:f], down[:, :f] = s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight
        if moe.shared_expert_gate is not None:
            gate_w = moe.shared_expert_gate.weight.detach().clone()
        else:
            down *= 2
    return {"shared_expert.gate_proj.weight": gate, "shared_expert.up_proj.weight": up,
            "shared_expert.down_proj.weight": down, "shared_expert_gate.weight": gate_w}


def _block_tensors(layer: nn.Module, shared_width: int | None) -> dict[str, Tensor]:
    """One FFN slot's tensors in Hugging Face names (relative to the ``mlp`` module)."""
    out = {k: v for k, v in layer.state_dict().items() if not k.startswith("shared_expert")}
    if shared_width is not None and isinstance(layer, MoE):
        with torch.no_grad():
            out |= _shared_tensors(layer, shared_width)
    return out


def _converted_tensors(model: nn.Module, slots: list[str], layers: list[nn.Module], shared_width: int | None) -> dict:
    prefixes = tuple(name + "." for name in slots)
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, layer in zip(slots, layers):
        out |= {f"{name}.{k}": v for k, v in _block_tensors(layer, shared_width).items()}
    return out


def _gpt_tensors(model: GPT, layers: list[nn.Module]) -> dict[str, Tensor]:
    """moekit GPT -> Llama / Mixtral names; q and k rows go from interleaved rotary pairs to halves."""
    c = model.config
    H, K, D = c.n_heads, c.d_model // c.n_heads, c.d_model
    halves = torch.cat([torch.arange(0, K, 2), torch.arange(1, K, 2)])
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.head.weight}
    for i, (block, layer) in enumerate(zip(model.blocks, layers)):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.detach().view(3, H, K, D)
        out |= {p + "self_attn.q_proj.weight": q[:, halves].reshape(D, D),
                p + "self_attn.k_proj.weight": k[:, halves].reshape(D, D),
                p + "self_attn.v_proj.weight": v.reshape(D, D).clone(), p + "self_attn.o_proj.weight": block.attn.proj.weight,
                p + "input_layernorm.weight": block.attn_norm.weight,
                p + "post_attention_layernorm.weight": block.ffn_norm.weight}
        out |= {p + "mlp." + n: t for n, t in _block_tensors(layer, None).items()}
    return out


def _checked_tensors(plan: _Plan) -> dict[str, Tensor]:
    """The plan's tensors, checked name by name and shape by shape against the target model built
    (on the meta device) from the plan's config; tied output embeddings left to transformers."""
    import transformers

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in plan.tensors().items()}
    if getattr(plan.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    with torch.device("meta"):
        want = getattr(transformers, plan.target.cls)(plan.config).state_dict()
    if getattr(plan.config, "tie_word_embeddings", False):
        want.pop("lm_head.weight", None)
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    need = {k: tuple(v.shape) for k, v in want.items()}
    if have != need:
        diff = sorted(set(have.items()) ^ set(need.items()))[:4]
        raise RuntimeError(f"export_hf: the tensors for {plan.target.cls} do not match its parameters ({diff})")
    return tensors


# ----------------------------------------------------------------------------------- tokenizers


def _saved_files(tokenizer) -> dict[str, bytes]:
    """The files a transformers tokenizer's ``save_pretrained`` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _wrapped(tok):
    """A ``tokenizers.Tokenizer`` as a transformers fast tokenizer (``<|endoftext|>`` its end of text)."""
    import transformers

    eos = EOS if tok.token_to_id(EOS) is not None else None
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


def _files_at(path: Path) -> dict[str, bytes]:
    fix = "the tokenizer files are damaged: copy them again from where they came from"
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        out = {}
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                verify_file(path / name, fix)  # against its checksum, in a moekit folder
                out[name] = (path / name).read_bytes()
        return out
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer {path}: no tokenizer.json or tokenizer_config.json there; pass a "
                                "tokenizer folder, a tokenizer.json or a tokenizer object")
    return {**_saved_files(_wrapped(load_tokenizer(file))), "tokenizer.json": file.read_bytes()}


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files that carry ``tokenizer`` in a model folder (``tokenizer.json``, ``tokenizer_config.json``,
    special tokens...), so that ``transformers.AutoTokenizer.from_pretrained(folder)`` loads it.

    ``tokenizer``: ``None`` (no files), a folder (its tokenizer files; a folder with only a
    ``tokenizer.json`` is treated as that file), a ``tokenizer.json`` (kept as it is, with a
    ``tokenizer_config.json`` for transformers), a ``tokenizers.Tokenizer`` or a transformers tokenizer.
    """
    if tokenizer is None:
        return {}
    if isinstance(tokenizer, (str, os.PathLike)):
        files = _files_at(Path(tokenizer))
    elif hasattr(tokenizer, "save_pretrained"):
        files = _saved_files(tokenizer)
    elif hasattr(tokenizer, "to_str") and hasattr(tokenizer, "token_to_id"):
        files = {**_saved_files(_wrapped(tokenizer)), "tokenizer.json": tokenizer.to_str().encode("utf-8")}
    else:
        raise TypeError(f"tokenizer: expected a path, a tokenizers.Tokenizer or a transformers tokenizer, got "
                        f"{type(tokenizer).__name__}")
    clash = sorted(set(files) & set(_OWN_FILES))
    if clash:
        raise ValueError(f"tokenizer: its files {clash} would replace the model's own; pass the tokenizer alone")
    return files


def _write_files(w: FolderWriter, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        w.write_bytes(name, data)


# ----------------------------------------------------------------------------------- writing


def _refused(e: _NotNative) -> ValueError:
    return ValueError(f"export_hf: {e}, which has no exact transformers counterpart; save the model in moekit's "
                      "format with moekit.convert.save(model, path)")


def hf_native(model: nn.Module) -> str | None:
    """The transformers class :func:`export_hf` writes ``model`` as (``"MixtralForCausalLM"``...), or
    ``None`` when some part of it has no exact counterpart (:func:`why_not_hf_native` says which)."""
    try:
        return _plan(model).target.cls
    except _NotNative:
        return None


def why_not_hf_native(model: nn.Module) -> str | None:
    """What keeps ``model`` from a Hugging Face-native folder (one clause), or ``None`` when nothing does."""
    try:
        _plan(model)
    except _NotNative as e:
        return str(e)
    return None


def _set_eos(plan: _Plan, files: dict[str, bytes]) -> None:
    """A moekit GPT's export carries its tokenizer's end-of-text id (``eos_token_id``, also the pad
    id), so transformers' ``generate`` stops where ``moekit.generate`` does."""
    if plan.record.get("family") != "moekit-gpt" or "tokenizer.json" not in files or \
            getattr(plan.config, "eos_token_id", None) is not None:
        return
    from tokenizers import Tokenizer

    eos = Tokenizer.from_str(files["tokenizer.json"].decode()).token_to_id(EOS)
    if eos is not None:
        plan.config.eos_token_id = plan.config.pad_token_id = eos


def _write_native(plan: _Plan, path: Path, tokenizer) -> Path:
    from safetensors.torch import save_file

    files = tokenizer_files(tokenizer)  # before the folder is opened: a bad tokenizer leaves nothing behind
    tensors = _checked_tensors(plan)
    _set_eos(plan, files)
    with write_folder(path, MODEL_KIND, "model folder") as w:
        w.write(WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        w.write_text("config.json", plan.config.to_json_string())
        w.write_text(CONVERT_FILE, json.dumps(plan.record, indent=1))
        _write_files(w, files)
    return path


def export_hf(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` (converted by moekit, a moekit GPT, or one :func:`moekit.convert.load` read from
    such a folder) to ``path`` as its transformers architecture (:func:`hf_native`), with the files
    of ``tokenizer`` (see :func:`tokenizer_files`); plain transformers loads the folder and computes
    the same logits. A ValueError names what does not map. Returns ``path``."""
    try:
        plan = _plan(model)
    except _NotNative as e:
        raise _refused(e) from None
    return _write_native(plan, Path(path), tokenizer)


def _moekit_record(model: nn.Module) -> dict:
    """``CONVERT_FILE`` of a moekit-format folder: the base class and config, the record, and how to
    rebuild what replaced the base model's FFNs (converted layers: ``layers`` of the record; a
    Hugging Face MoE's patched layers: ``moe_layers``, each layer's spec by module name)."""
    base = {"format": FORMAT, "class": type(model).__name__, "config": _hf_base(model)}
    if any(isinstance(m, ConvertedFFN) for m in model.modules()):
        return {**base, **model.moekit_convert}
    layers = patched_layers(model)
    if not layers:
        raise ValueError(f"moekit.convert.save: this {type(model).__name__} came from a Hugging Face-native folder; "
                         "save it with format='auto' or 'hf'")
    stray = [n for n, m in model.named_modules() if isinstance(m, MoE) and n not in layers]
    if stray:
        raise ValueError(f"moekit.convert.save: the MoE layers {stray} stand where no transformers MoE block was "
                         "(moekit's format rebuilds the layers in place of the blocks)")
    return {**base, **(getattr(model, "moekit_convert", None) or {}),
            "moe_layers": {n: layer_spec(m) for n, m in layers.items()}}


def _write_moekit(model: nn.Module, path: Path, tokenizer) -> Path:
    from safetensors.torch import save_model

    meta = _moekit_record(model)
    stub = {"model_type": "moekit", "vocab_size": NOT_TRANSFORMERS, "moekit_format": FORMAT}
    files = tokenizer_files(tokenizer)
    with write_folder(path, MODEL_KIND, "model folder") as w:
        w.write(WEIGHTS, lambda tmp: save_model(model, tmp))
        w.write_text("config.json", json.dumps(stub, indent=1))
        w.write_text(CONVERT_FILE, json.dumps(meta, indent=1))
        _write_files(w, files)
    return path


def check_format(format: str) -> None:
    """A ValueError unless ``format`` is one of :data:`FORMATS`."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")


def save_converted(model: nn.Module, path: str | os.PathLike, tokenizer=None, format: str = "auto") -> Path:
    """Write a Hugging Face model converted by moekit, or one whose MoE blocks are ``moekit.MoE``
    layers (:func:`moekit.convert.patch_hf_model`, ``moekit.load``; pruned, merged or quantized by
    :mod:`moekit.compress`): HF-native (:func:`export_hf`) when ``format`` is ``"hf"``, or ``"auto"``
    and every layer maps exactly; moekit's format otherwise (``"moekit"``)."""
    check_format(format)
    if getattr(model, "moekit_convert", None) is None and not patched_layers(model):
        raise ValueError("moekit.convert.save: the model was not converted by moekit.convert and has no moekit MoE "
                         "layer (use model.save_pretrained for plain transformers models)")
    if format != "moekit":
        try:
            return _write_native(_plan(model), Path(path), tokenizer)
        except _NotNative as e:
            if format == "hf":
                raise _refused(e) from None
    return _write_moekit(model, Path(path), tokenizer)


# ----------------------------------------------------------------------------------- routers, save_pretrained


def router_training(moe: MoE) -> dict:
    """The training-only settings of a top-k layer's router (kept beside a Hugging Face-native export)."""
    return {k: getattr(moe.gate, k) for k in _TRAINING if hasattr(moe.gate, k)}


def restore_router_training(model: nn.Module, settings: list[dict], where: str) -> None:
    """Put the :func:`router_training` settings back on the MoE layers of ``model``, in order."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if len(settings) != len(moes):
        raise ValueError(f"{where}: router_training lists {len(settings)} layers, the model has {len(moes)} MoE layers")
    for moe, s in zip(moes, settings):
        for k in _TRAINING:
            if k in s:
                setattr(moe.gate, k, float(s[k]))


#: transformers' ``save_pretrained`` arguments taken at their default values (anything else is refused)
_HF_DEFAULTS = {"state_dict": None, "push_to_hub": False, "variant": None, "token": None, "save_peft_format": True,
                "save_original_format": True, "distributed_checkpoint": False, "safe_serialization": True}


class SavePretrained:
    """``save_pretrained`` of a model moekit converted or loaded: :func:`save_converted` behind
    transformers' signature, with ``tokenizer`` and ``format`` (keywords) as in
    :func:`moekit.convert.save`. ``is_main_process=False`` writes nothing; ``max_shard_size`` is
    honoured when the weights fit in one file; the other arguments of transformers are taken at
    their defaults only (a ValueError names one that is not)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, is_main_process: bool = True, state_dict: dict | None = None,
                 push_to_hub: bool = False, max_shard_size: int | str = "50GB", *, tokenizer=None, format: str = "auto",
                 **kwargs) -> Path | None:
        from transformers.utils.hub import convert_file_size_to_int

        for k, v in {"state_dict": state_dict, "push_to_hub": push_to_hub, **kwargs}.items():
            if k not in _HF_DEFAULTS or v is not _HF_DEFAULTS[k] and v != _HF_DEFAULTS[k]:
                raise ValueError(f"save_pretrained: {k}={v!r} is not supported for a model converted by moekit (it "
                                 "writes one checksummed folder, as moekit.convert.save does); leave it out")
        size = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        if size > convert_file_size_to_int(max_shard_size):
            raise ValueError(f"save_pretrained: max_shard_size={max_shard_size!r} is smaller than the weights "
                             f"({size:,} bytes), which moekit writes as one file; leave it out")
        if not is_main_process:
            return None
        return save_converted(self.model, save_directory, tokenizer, format)


def bind_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained`` write what :func:`moekit.convert.load` reads (:class:`SavePretrained`)."""
    model.save_pretrained = SavePretrained(model)
    return model
