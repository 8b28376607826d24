"""Dense -> MoE by cutting each FFN's hidden channels into experts (DSMoE, MoEfication, LLaMA-MoE),
by copying it (upcycling), or, as a baseline, by keeping only its most important channels (pruning).

``FFN(x) = sum_i (act(x W_i) * x U_i) V_i`` over any partition of the hidden channels into sets
``i`` (papers.md §4.2), so with every expert on at weight 1 the MoE computes the dense FFN exactly.
The sets are contiguous blocks (DSMoE) or balanced clusters of channels: by their weights
(MoEfication's parameter clustering) or by co-activation on calibration text (channels that fire
on the same tokens go together). Each call returns a converted copy; the input model is untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.convert.build import ConvertedFFN, dense_from_channels, moe_from_channels
from moekit.convert.ffn import DenseFFN, FFNSite, collect_hidden, family_of, find_ffns
from moekit.layer import FFN, MoE
from moekit.routing import Router

__all__ = ["partition", "upcycle", "prune", "contiguous_groups", "cluster_groups", "channel_importance",
           "partition_ffn", "moe_from_ffn", "partition_gpt", "valid_expert_counts", "calibration_batches",
           "active_fraction", "default_run"]

MIN_CALIBRATION_TOKENS = 512


def valid_expert_counts(d_ff: int, limit: int = 64) -> list[int]:
    return [e for e in range(1, min(d_ff, limit) + 1) if d_ff % e == 0]


def _check_divides(d_ff: int, num_experts: int, who: str) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1 or d_ff % num_experts:
        raise ValueError(f"{who}: num_experts={num_experts} does not divide d_ff={d_ff}; "
                         f"valid counts: {valid_expert_counts(d_ff)}")


def contiguous_groups(d_ff: int, num_experts: int) -> Tensor:
    """``[E, d_ff / E]``: expert ``e`` holds channels ``e*f .. (e+1)*f - 1`` (DSMoE)."""
    _check_divides(d_ff, num_experts, "contiguous_groups")
    return torch.arange(d_ff).view(num_experts, -1)


def cluster_groups(features: Tensor, num_experts: int, iters: int = 25, seed: int = 0) -> Tensor:
    """Balanced k-means of the rows of ``features [F, k]`` into ``num_experts`` equal clusters
    (cosine similarity; each step assigns channels greedily, most confident first, to the nearest
    centroid that still has room). Returns ``[E, F / E]`` channel ids, sorted within each expert."""
    F = features.shape[0]
    _check_divides(F, num_experts, "cluster_groups")
    size = F // num_experts
    x = nn.functional.normalize(features.detach().double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    # k-means++ seeding
    centroids = [x[torch.randint(F, (1,), generator=g)].squeeze(0)]
    for _ in range(1, num_experts):
        d = (1 - x @ torch.stack(centroids).T).clamp_min(0).min(dim=1).values
        centroids.append(x[torch.multinomial(d + 1e-12, 1, generator=g)].squeeze(0))
    c = torch.stack(centroids)
    assign = torch.full((F,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = x @ c.T  # [F, E]
        order = torch.argsort(sim.reshape(-1), descending=True).tolist()
        new, room, left = [-1] * F, [size] * num_experts, F
        for flat in order:  # plain Python lists: this loop visits up to F * E pairs
            ch, e = divmod(flat, num_experts)
            if new[ch] < 0 and room[e] > 0:
                new[ch] = e
                room[e] -= 1
                left -= 1
                if left == 0:
                    break
        new_t = torch.tensor(new)
        if torch.equal(new_t, assign):
            break
        assign = new_t
        c = torch.stack([nn.functional.normalize(x[assign == e].mean(0), dim=0) for e in range(num_experts)])
    return torch.stack([torch.nonzero(assign == e).squeeze(1) for e in range(num_experts)])


# ----------------------------------------------------------------------------------- calibration


def calibration_batches(calibration, batch_size: int = 8) -> list:
    """Calibration data as a list of batches: a ``[B, T]`` tensor of token ids is cut into batches of
    ``batch_size`` sequences; a list of tensors (or of dicts for Hugging Face models) is used as is."""
    if isinstance(calibration, Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration: expected token ids [num_sequences, seq_len] (int64), got "
                             f"{tuple(calibration.shape)} {calibration.dtype}")
        return list(calibration.split(batch_size))
    return list(calibration)


def _tokens(batches: list) -> int:
    return sum(int(b.numel()) if isinstance(b, Tensor) else int(b["input_ids"].numel()) for b in batches)


def default_run(model: nn.Module, batch) -> object:
    """One calibration forward: ``model(ids)`` for moekit's GPT, ``model(input_ids=ids)`` for transformers."""
    if isinstance(batch, dict):
        return model(**batch)
    from moekit.models import GPT

    return model(batch) if isinstance(model, GPT) else model(input_ids=batch)


def _calibration(calibration, min_tokens: int, who: str) -> list:
    if calibration is None:
        raise ValueError(f"{who}: this setting needs calibration token ids (a [num_sequences, seq_len] tensor)")
    batches = calibration_batches(calibration)
    n = _tokens(batches)
    if n < min_tokens:
        raise ValueError(f"{who}: calibration text too small: {n} tokens, need at least {min_tokens}; "
                         "pass more sequences (or lower min_tokens)")
    return batches


@torch.no_grad()
def channel_importance(model: nn.Module, calibration, run: Callable | None = None,
                       min_tokens: int = MIN_CALIBRATION_TOKENS, max_samples: int = 0,
                       progress: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """Per FFN: mean ``|h|`` of each hidden channel over the calibration tokens (``h`` = the down
    projection's input, as Read-ME's code measures it), and, if ``max_samples > 0``, ``|h|`` of up to
    that many tokens ``[F, samples]`` (co-activation features for clustering)."""
    batches = _calibration(calibration, min_tokens, "channel_importance")
    sites = find_ffns(model)
    sums = [None] * len(sites)
    samples: list[list[Tensor]] = [[] for _ in sites]

    def reduce(layer: int, h: Tensor) -> None:
        a = h.abs()
        sums[layer] = a.sum(0) if sums[layer] is None else sums[layer] + a.sum(0)
        have = sum(s.shape[0] for s in samples[layer])
        if have < max_samples:
            samples[layer].append(a[: max_samples - have].cpu())

    was = model.training
    model.eval()
    try:
        from rich.progress import track

        n = collect_hidden(model, sites, track(batches, description="calibration", disable=not progress,
                                               transient=True), run or default_run, reduce)
    finally:
        model.train(was)
    means = [s / n for s in sums]
    feats = [torch.cat(s).T.contiguous() if s else None for s in samples]
    return means, feats


# ----------------------------------------------------------------------------------- the conversions


def _apply(model: nn.Module, method: str, settings: dict,
           build: Callable[[FFNSite, DenseFFN], tuple[nn.Module, dict]]) -> nn.Module:
    """A copy of ``model`` with every FFN replaced by ``build(site, ffn) -> (module, spec)``; records
    the method, its settings and the per-layer specs (for saving and loading, with each layer's
    channel groups) in ``model.moekit_convert``; a GPT's config gets the specs without the groups."""
    family = family_of(model)
    new = copy.deepcopy(model)
    specs = []
    for site in find_ffns(new):
        ffn = site.read()
        module, spec = build(site, ffn)
        if family.name == "moekit-gpt":
            if ffn.has_bias:
                raise ValueError("moekit.convert: GPT FFNs with biases are not supported")
            site.install(module)
        else:
            site.install(ConvertedFFN(module, ffn.down_bias))
        specs.append(spec)
    if family.name == "moekit-gpt":
        from dataclasses import replace

        extra = {**new.config.extra, "convert": {"method": method, **settings}}
        new.config = replace(new.config, ffn=[_gpt_spec(s) for s in specs], extra=extra)
    new.moekit_convert = {"family": family.name, "method": method, "settings": settings, "layers": specs}
    return new


def _router_spec(router: str | Router, router_args: dict | None) -> tuple[str, dict]:
    if isinstance(router, Router):
        raise TypeError("moekit.convert: pass the router by name (e.g. 'sigmoid_ste', 'topk') with router_args, "
                        "so that the converted model can be saved and rebuilt")
    return router, dict(router_args or {})


def partition(model: nn.Module, num_experts: int, router: str = "sigmoid_ste", router_args: dict | None = None,
              grouping: str = "contiguous", features: str = "weights", calibration=None, run: Callable | None = None,
              seed: int = 0, min_tokens: int = MIN_CALIBRATION_TOKENS, max_samples: int = 2048,
              progress: bool = False) -> nn.Module:
    """DSMoE: cut every FFN's hidden channels into ``num_experts`` experts of equal width.

    ``grouping="contiguous"`` takes blocks (the paper); ``"cluster"`` takes balanced clusters of
    channels by ``features="weights"`` (each channel's ``gate``/``up`` rows and ``down`` column) or
    ``"activations"`` (co-activation: ``|h|`` over up to ``max_samples`` calibration tokens). The
    default router is DSMoE's sigmoid gate with threshold and straight-through estimator
    (``SigmoidSTE``; fine-tune with its sparsity loss); any registered router name works.
    With every expert on at weight 1 the result equals the dense model.
    """
    router, router_args = _router_spec(router, router_args)
    if grouping not in ("contiguous", "cluster"):
        raise ValueError(f"partition: grouping must be 'contiguous' or 'cluster', got {grouping!r}")
    if features not in ("weights", "activations"):
        raise ValueError(f"partition: features must be 'weights' or 'activations', got {features!r}")
    sites = find_ffns(model)
    for s in sites:
        _check_divides(s.read().d_ff, num_experts, "partition")
    feats = None
    if grouping == "cluster" and features == "activations":
        _, feats = channel_importance(model, calibration, run, min_tokens, max_samples, progress)

    def build(site: FFNSite, ffn: DenseFFN):
        if grouping == "contiguous":
            groups = contiguous_groups(ffn.d_ff, num_experts)
        else:
            f = feats[site.layer] if feats is not None else torch.cat(
                [ffn.up, *([ffn.gate] if ffn.gate is not None else []), ffn.down.T], dim=1)
            groups = cluster_groups(f, num_experts, seed=seed)
        spec = {"kind": "moe", "num_experts": num_experts, "d_ff": ffn.d_ff // num_experts, "router": router,
                "router_args": router_args, "activation": ffn.activation, **_bias_flags(ffn), "groups": groups.tolist()}
        return moe_from_channels(ffn, groups, router, router_args), spec

    return _apply(model, "partition", {"num_experts": num_experts, "router": router, "router_args": router_args,
                                       "grouping": grouping, "features": features, "seed": seed}, build)


def upcycle(model: nn.Module, num_experts: int, k: int = 2, router: str = "topk", router_args: dict | None = None,
            expert_d_ff: int | None = None) -> nn.Module:
    """Sparse upcycling: every expert starts as a copy of the dense FFN (or of its first
    ``expert_d_ff`` channels), with a fresh router (``TopK(k)`` renormalised by default, so the
    upcycled model computes exactly the dense one until the copies are trained apart)."""
    router_args = {"k": k, **(router_args or {})} if router == "topk" else dict(router_args or {})
    router, router_args = _router_spec(router, router_args)

    def build(site: FFNSite, ffn: DenseFFN):
        f = expert_d_ff or ffn.d_ff
        if not 1 <= f <= ffn.d_ff:
            raise ValueError(f"upcycle: expert_d_ff must lie in [1, {ffn.d_ff}], got {f}")
        groups = torch.arange(f).repeat(num_experts, 1)
        spec = {"kind": "moe", "num_experts": num_experts, "d_ff": f, "router": router, "router_args": router_args,
                "activation": ffn.activation, **_bias_flags(ffn)}
        return moe_from_channels(ffn, groups, router, router_args), spec

    return _apply(model, "upcycle", {"num_experts": num_experts, "router": router, "router_args": router_args,
                                     "expert_d_ff": expert_d_ff}, build)


def prune(model: nn.Module, keep: float, calibration=None, run: Callable | None = None,
          min_tokens: int = MIN_CALIBRATION_TOKENS, progress: bool = False) -> nn.Module:
    """Structured pruning, the baseline at equal active size: keep the ``keep`` fraction of each FFN's
    hidden channels with the largest mean ``|h|`` on the calibration tokens (or, without calibration,
    the largest ``||up_c|| * ||down_c||`` weight magnitude)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"prune: keep must lie in (0, 1], got {keep!r}")
    imp = channel_importance(model, calibration, run, min_tokens, progress=progress)[0] if calibration is not None else None

    def build(site: FFNSite, ffn: DenseFFN):
        score = imp[site.layer] if imp is not None else ffn.up.norm(dim=1) * ffn.down.norm(dim=0) * (
            ffn.gate.norm(dim=1) if ffn.gate is not None else 1)
        n = max(1, round(keep * ffn.d_ff))
        channels = torch.sort(torch.topk(score, n).indices).values
        spec = {"kind": "dense", "d_ff": n, "activation": ffn.activation, **_bias_flags(ffn),
                "channels": channels.tolist()}
        return dense_from_channels(ffn, channels), spec

    return _apply(model, "prune", {"keep": keep, "score": "activation" if imp is not None else "weight"}, build)


def _bias_flags(ffn: DenseFFN) -> dict:
    return {"bias": ffn.has_bias or ffn.gate_bias is not None, "out_bias": ffn.down_bias is not None}


def _gpt_spec(spec: dict) -> dict:
    """The per-layer spec without bookkeeping that GPTConfig does not need (kept in moekit_convert)."""
    return {k: v for k, v in spec.items() if k not in ("groups", "channels")}


# ----------------------------------------------------------------------------------- moekit FFN helpers


def partition_ffn(ffn: FFN, num_experts: int):
    """``GroupedExperts`` holding the ``num_experts`` contiguous blocks of a moekit ``FFN``'s hidden units."""
    return moe_from_ffn(ffn, num_experts, "softmax").experts


def _dense_of(ffn: FFN) -> DenseFFN:
    if not isinstance(ffn, FFN):
        raise TypeError(f"partition_ffn: expected a moekit FFN, got {type(ffn).__name__}")
    g = ffn.gate_proj if ffn.act.gated else None
    return DenseFFN(up=ffn.up_proj.weight.detach(), down=ffn.down_proj.weight.detach(), activation=ffn.activation,
                    gate=None if g is None else g.weight.detach(), up_bias=_d(ffn.up_proj.bias),
                    gate_bias=None if g is None else _d(g.bias), down_bias=_d(ffn.down_proj.bias))


def _d(t):
    return None if t is None else t.detach()


def moe_from_ffn(ffn: FFN, num_experts: int, router: Router | str) -> MoE:
    """An MoE whose experts are the contiguous blocks of ``ffn`` (a fresh router decides which run)."""
    dense = _dense_of(ffn)
    if dense.down_bias is not None:
        raise ValueError("moe_from_ffn: FFNs with a down bias need moekit.convert.partition (ConvertedFFN adds it)")
    _check_divides(dense.d_ff, num_experts, "partition_ffn")
    return moe_from_channels(dense, contiguous_groups(dense.d_ff, num_experts), router)


def partition_gpt(model, num_experts: int, router: str, router_args: dict | None = None):
    """A copy of a dense ``moekit.models.GPT`` whose every FFN is cut into ``num_experts`` blocks."""
    if any(not isinstance(b.ffn, FFN) for b in model.blocks):
        raise ValueError("partition_gpt: every layer of the model must have a dense FFN")
    return partition(model, num_experts, router, router_args)


def active_fraction(model: nn.Module, dense_d_ff: int | None = None) -> float:
    """Mean fraction of the FFN hidden channels computed per token in the last forward of a
    partitioned or refactored model (a shared expert counts in full), relative to ``dense_d_ff``
    (the dense FFN's width; default: the layer's own total, right for partitions, whose experts
    add up to the dense FFN)."""
    fr = []
    for m in model.modules():
        if isinstance(m, MoE) and m.last_routing is not None:
            r = m.last_routing
            n = int((r.weight.detach() != 0).sum()) / max(r.num_tokens, 1)
            shared = m.shared_expert.down_proj.in_features if m.shared_expert is not None else 0
            fr.append((shared + n * m.d_ff) / (dense_d_ff or shared + m.num_experts * m.d_ff))
    return sum(fr) / len(fr) if fr else math.nan
