"""Finding the FFNs of a dense model: a small registry of model families.

Each family knows where its FFNs live, how to read their weights into one common form
(:class:`DenseFFN`, moekit's ``[out, in]`` orientation) and how to put a new module in their
place. Built in: Llama, Mistral, Qwen2, Qwen3 (gated, no bias), GPT-2 (``Conv1D``, biases),
BERT (MiniLM included; the FFN spans ``intermediate.dense`` and ``output.dense``) and moekit's own
GPT. A new family is one :func:`register_family` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.experts import ACTIVATIONS, get_activation
from moekit.layer import FFN
from moekit.models import GPT

__all__ = ["DenseFFN", "FFNSite", "Family", "register_family", "supported_families", "find_ffns", "family_of"]


@dataclass
class DenseFFN:
    """A dense FFN ``down(act(gate(x)) * up(x)) (+ b)`` or ``down(act(up(x))) (+ b)``, weights ``[out, in]``."""

    up: Tensor  # [F, D]
    down: Tensor  # [D, F]
    activation: str  # a moekit activation name: swiglu, geglu, gelu, gelu_tanh, relu, silu
    gate: Tensor | None = None  # [F, D], gated activations only
    up_bias: Tensor | None = None  # [F]
    gate_bias: Tensor | None = None  # [F]
    down_bias: Tensor | None = None  # [D]

    @property
    def d_model(self) -> int:
        return self.up.shape[1]

    @property
    def d_ff(self) -> int:
        return self.up.shape[0]

    @property
    def has_bias(self) -> bool:
        return self.up_bias is not None or self.down_bias is not None

    def hidden(self, x: Tensor) -> Tensor:
        """The down projection's input ``act(gate x) * up x`` (or ``act(up x)``): ``[..., F]``."""
        act = get_activation(self.activation)
        up = nn.functional.linear(x, self.up, self.up_bias)
        if act.gated:
            return act.fn(nn.functional.linear(x, self.gate, self.gate_bias)) * up
        return act.fn(up)

    def __call__(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.hidden(x), self.down, self.down_bias)


@dataclass
class FFNSite:
    """One FFN of a model: where it is, how to read it, how to replace it."""

    name: str  # module path of the FFN (e.g. ``model.layers.3.mlp``)
    layer: int
    read: Callable[[], DenseFFN]
    install: Callable[[nn.Module], None]  # put a module ``[..., D] -> [..., D]`` in the FFN's place
    down: nn.Module  # the module whose *input* is the FFN's hidden activation (calibration hooks)
    current: Callable[[], nn.Module]  # the module now in the FFN's place


@dataclass(frozen=True)
class Family:
    """A model family: ``matches(model)`` and ``sites(model)`` (its FFNs in layer order)."""

    name: str
    matches: Callable[[nn.Module], bool]
    sites: Callable[[nn.Module], list[FFNSite]]
    notes: str = ""
    model_types: tuple[str, ...] = field(default=())


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add (or replace) a family; later registrations are tried first."""
    _FAMILIES.pop(family.name, None)
    _FAMILIES[family.name] = family
    return family


def supported_families() -> list[str]:
    return sorted(_FAMILIES)


def family_of(model: nn.Module) -> Family:
    for fam in reversed(list(_FAMILIES.values())):
        if fam.matches(model):
            return fam
    mt = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"moekit.convert: unsupported architecture {type(model).__name__}"
        + (f" (model_type {mt!r})" if mt else "")
        + f"; supported families: {supported_families()}. Register a new one with "
        "moekit.convert.register_family(Family(name, matches, sites)) — see moekit/convert/ffn.py for examples"
    )


def find_ffns(model: nn.Module) -> list[FFNSite]:
    """The FFNs of ``model`` in layer order (raises for an unsupported architecture)."""
    sites = family_of(model).sites(model)
    if not sites:
        raise ValueError(f"moekit.convert: no FFN found in {type(model).__name__}")
    return sites


# ----------------------------------------------------------------------------------- activations

_HF_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh"}
_HF_PLAIN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
             "relu": "relu", "silu": "silu", "swish": "silu"}


def _hf_activation(config, gated: bool) -> str:
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    table = _HF_GATED if gated else _HF_PLAIN
    if name not in table:
        raise ValueError(f"moekit.convert: activation {name!r} is not supported for "
                         f"{'gated' if gated else 'plain'} FFNs; supported: {sorted(table)}")
    act = table[name]
    if act not in ACTIVATIONS:
        raise ValueError(f"moekit.convert: activation {name!r} has no moekit equivalent yet")
    return act


def _w(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _hf_type(model: nn.Module, *types: str) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in types and \
        type(model).__module__.startswith("transformers.")


# ----------------------------------------------------------------------------------- built-in families


def _gated_sites(model: nn.Module) -> list[FFNSite]:
    """Llama-like decoders: ``...layers.{i}.mlp`` with ``gate_proj``, ``up_proj``, ``down_proj``."""
    sites = []
    for name, mod in model.named_modules():
        if not all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        act = _hf_activation(model.config, gated=True)

        def read(mod=mod, act=act) -> DenseFFN:
            return DenseFFN(up=_w(mod.up_proj.weight), down=_w(mod.down_proj.weight), activation=act,
                            gate=_w(mod.gate_proj.weight), up_bias=_w(mod.up_proj.bias),
                            gate_bias=_w(mod.gate_proj.bias), down_bias=_w(mod.down_proj.bias))

        sites.append(FFNSite(name, len(sites), read, lambda m, p=parent, a=attr: setattr(p, a, m), mod.down_proj,
                             lambda p=parent, a=attr: getattr(p, a)))
    return sites


def _gpt2_sites(model: nn.Module) -> list[FFNSite]:
    """GPT-2: ``h.{i}.mlp`` with ``Conv1D`` layers ``c_fc`` / ``c_proj`` (weights stored ``[in, out]``)."""
    sites = []
    act = _hf_activation(model.config, gated=False)
    for name, mod in model.named_modules():
        if type(mod).__name__ != "GPT2MLP":
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)

        def read(mod=mod) -> DenseFFN:
            return DenseFFN(up=_w(mod.c_fc.weight).t(), down=_w(mod.c_proj.weight).t(), activation=act,
                            up_bias=_w(mod.c_fc.bias), down_bias=_w(mod.c_proj.bias))

        sites.append(FFNSite(name, len(sites), read, lambda m, p=parent, a=attr: setattr(p, a, m), mod.c_proj,
                             lambda p=parent, a=attr: getattr(p, a)))
    return sites


class _Passthrough(nn.Module):
    """Stands in for BERT's ``output.dense`` once the whole FFN lives in ``intermediate``."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _bert_sites(model: nn.Module) -> list[FFNSite]:
    """BERT: the FFN is ``layer.{i}.intermediate.dense`` (+ activation) then ``layer.{i}.output.dense``;
    the converted FFN replaces ``intermediate`` and ``output.dense`` becomes a pass-through (the
    dropout, residual and LayerNorm of ``output`` stay)."""
    sites = []
    act = _hf_activation(model.config, gated=False)
    for name, mod in model.named_modules():
        if type(mod).__name__ not in ("BertLayer", "RobertaLayer"):
            continue
        inter, out = mod.intermediate, mod.output

        def read(inter=inter, out=out) -> DenseFFN:
            down = out.dense
            if isinstance(down, _Passthrough):
                raise ValueError("moekit.convert: this BERT layer is already converted")
            return DenseFFN(up=_w(inter.dense.weight), down=_w(down.weight), activation=act,
                            up_bias=_w(inter.dense.bias), down_bias=_w(down.bias))

        def install(m, layer=mod) -> None:
            layer.intermediate = m
            layer.output.dense = _Passthrough()

        sites.append(FFNSite(f"{name}.intermediate", len(sites), read, install, out.dense,
                             lambda layer=mod: layer.intermediate))
    return sites


def _gpt_sites(model: nn.Module) -> list[FFNSite]:
    sites = []
    for i, block in enumerate(model.blocks):
        ffn = block.ffn

        def read(ffn=ffn, i=i) -> DenseFFN:
            if not isinstance(ffn, FFN):
                raise ValueError(f"moekit.convert: layer {i} of the GPT is not a dense FFN ({type(ffn).__name__})")
            return DenseFFN(up=_w(ffn.up_proj.weight), down=_w(ffn.down_proj.weight), activation=ffn.activation,
                            gate=_w(ffn.gate_proj.weight) if ffn.act.gated else None, up_bias=_w(ffn.up_proj.bias),
                            gate_bias=_w(ffn.gate_proj.bias) if ffn.act.gated else None,
                            down_bias=_w(ffn.down_proj.bias))

        down = ffn.down_proj if isinstance(ffn, FFN) else ffn
        sites.append(FFNSite(f"blocks.{i}.ffn", i, read, lambda m, b=block: setattr(b, "ffn", m), down,
                             lambda b=block: b.ffn))
    return sites


def _is_gpt(model: nn.Module) -> bool:
    return isinstance(model, GPT)


register_family(Family("moekit-gpt", _is_gpt, _gpt_sites, "moekit.models.GPT"))
register_family(Family("bert", lambda m: _hf_type(m, "bert", "roberta"), _bert_sites,
                       "BertModel / BertFor* (MiniLM, all-MiniLM-L6-v2), RoBERTa", ("bert", "roberta")))
register_family(Family("gpt2", lambda m: _hf_type(m, "gpt2"), _gpt2_sites, "GPT2Model / GPT2LMHeadModel", ("gpt2",)))
for _name, _types in (("llama", ("llama",)), ("mistral", ("mistral",)), ("qwen2", ("qwen2",)), ("qwen3", ("qwen3",))):
    register_family(Family(_name, lambda m, t=_types: _hf_type(m, *t), _gated_sites,
                           f"{_name}: *.layers.{{i}}.mlp with gate_proj/up_proj/down_proj", _types))


@torch.no_grad()
def collect_hidden(model: nn.Module, sites: list[FFNSite], batches, run: Callable[[nn.Module, object], object],
                   reduce: Callable[[int, Tensor], None]) -> int:
    """Run ``run(model, batch)`` for every calibration batch, calling ``reduce(layer, h[N, F])`` with the
    FFN hidden activation (the down projection's input) of every site; returns the tokens seen."""
    seen = 0
    handles = []
    for s in sites:
        handles.append(s.down.register_forward_hook(
            lambda mod, args, out, layer=s.layer: reduce(layer, args[0].detach().reshape(-1, args[0].shape[-1]).float())))
    try:
        for batch in batches:
            run(model, batch)
            seen += int(batch.numel()) if isinstance(batch, Tensor) else int(batch["input_ids"].numel())
    finally:
        for h in handles:
            h.remove()
    return seen
