"""Read-ME (Cai et al., NeurIPS 2024; papers.md §2): refactor a dense model into a pre-gated MoE.

1. Channel importance per layer and domain: mean ``|h_c|`` of the down projection's input over the
   domain's calibration tokens (what the official code measures).
2. Per layer, each domain keeps its top ``keep`` fraction of channels; the channels every domain
   keeps form an always-on residual expert; expert ``i`` holds domain ``i``'s other channels, so
   all experts have equal width and a token computes ``keep`` of the dense FFN.
3. ``moekit.models.pregate.PreGate``, one small causal transformer over token ids, picks each token's
   expert for every layer before the backbone runs (top-1, no gate value).
4. :func:`tune` alternates router rounds (backbone frozen, the official distillation loss) and
   expert rounds (router frozen, LM loss), the learning rates decaying 0.8x per round.

Ours, where the official code differs or is silent: the domain masks keep exactly the top ``keep``
fraction (the code's strict threshold keeps one channel fewer); channels shared by some but not
all domains are copied into each of their experts from the start (the code keeps them tied through
the dense matrices during tuning and unties them at the end); the distillation targets are
computed from the current converted layers (residual + every expert's channels of the token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from moekit.convert.build import RoutingContext, bias_flags, empty_moe, moe_from_channels
from moekit.convert.calibration import MIN_CALIBRATION_TOKENS, channel_importance, default_run
from moekit.convert.ffn import DenseFFN, FFNSite
from moekit.convert.method import ConversionMethod, register_method
from moekit.layer import MoE
from moekit.models import GPT
from moekit.models.pregate import PreGate
from moekit.train.schedule import warmup_cosine
from moekit.train.step import lm_and_aux, optimizer_step

__all__ = ["Refactor", "refactor", "domain_masks", "attach_pregate", "distillation_loss", "distillation_targets",
           "router_loss", "tune", "pregate_of"]


def domain_masks(importance: list[Tensor], keep: float) -> tuple[Tensor, Tensor]:
    """From one layer's per-domain channel importance (``[F]`` each): the residual channels (kept by
    every domain) and ``[E, w]`` the channels of each domain's expert (the rest of its top ``keep``)."""
    F_ = importance[0].numel()
    n = max(1, round(keep * F_))
    masks = torch.zeros(len(importance), F_, dtype=torch.bool)
    for i, imp in enumerate(importance):
        masks[i, torch.topk(imp, n).indices] = True
    residual = masks.all(0)
    specific = masks & ~residual
    if int(specific[0].sum()) == 0:
        raise ValueError("refactor: every domain keeps the same channels in a layer (no domain-specific expert); "
                         "use more distinct domains or a smaller keep fraction")
    return torch.nonzero(residual).squeeze(1), torch.stack([torch.nonzero(m).squeeze(1) for m in specific])


def _embedding_weight(model: nn.Module) -> Tensor:
    if isinstance(model, GPT):
        return model.embed.weight
    return model.get_input_embeddings().weight


def attach_pregate(model: nn.Module, pregate: PreGate, context: RoutingContext) -> None:
    """Give a converted Hugging Face model its PreGate: a forward pre-hook routes the whole input
    sequence before the backbone runs and hands the expert ids to every converted layer."""
    model.add_module("moekit_pregate", pregate)

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("a Read-ME model needs input_ids (its PreGate routes from the token ids)")
        past = kwargs.get("past_key_values")
        if past is not None and getattr(past, "get_seq_length", lambda: 0)() > 0:
            raise ValueError("a refactored transformers model routes whole sequences: call it without "
                             "past_key_values (incremental decoding with a PreGate is supported by moekit's GPT)")
        context.expert_ids = module.moekit_pregate.route(ids)
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)


def pregate_of(model: nn.Module) -> PreGate:
    p = getattr(model, "pregate", None) or getattr(model, "moekit_pregate", None)
    if not isinstance(p, PreGate):
        raise ValueError("this model has no PreGate; convert it with moekit.convert.refactor")
    return p


@register_method("refactor")
class Refactor(ConversionMethod):
    """Read-ME's conversion: see :func:`refactor`."""

    empty_layer = staticmethod(empty_moe)
    routed_by_context = True

    def __init__(self, domains: dict[str, Tensor], keep: float = 0.5, pregate: dict | None = None,
                 run: Callable | None = None, min_tokens: int = MIN_CALIBRATION_TOKENS, seed: int = 0,
                 progress: bool = False) -> None:
        if not isinstance(domains, dict) or len(domains) < 2:
            raise ValueError("refactor: domains must map at least 2 domain names to calibration token ids")
        if not 0 < keep < 1:
            raise ValueError(f"refactor: keep must lie in (0, 1), got {keep!r}")
        self.domains, self.names, self.keep, self.pregate_args = domains, list(domains), keep, dict(pregate or {})
        self.run, self.min_tokens, self.seed, self.progress = run, min_tokens, seed, progress
        self.importance: dict[str, list[Tensor]] = {}
        self.gate: PreGate | None = None

    def prepare(self, model: nn.Module) -> None:
        """Each domain's channel importance, then the PreGate (seeded), initialised from the LM embedding."""
        self.importance = {n: channel_importance(model, self.domains[n], self.run, self.min_tokens,
                                                 progress=self.progress)[0] for n in self.names}
        vocab = _embedding_weight(model).shape[0]
        torch.manual_seed(self.seed)
        args = dict(self.pregate_args)
        seq = getattr(getattr(model, "config", None), "max_seq_len", None) or getattr(
            getattr(model, "config", None), "max_position_embeddings", None)
        if seq and "max_seq_len" not in args:
            args["max_seq_len"] = seq
        self.gate = PreGate(vocab, len(self.names), **args)
        self.gate.init_embedding(_embedding_weight(model).detach())

    def settings(self) -> dict:
        return {"domains": self.names, "keep": self.keep, "pregate": self.gate.config()}

    def build(self, site: FFNSite, ffn: DenseFFN) -> tuple[nn.Module, dict]:
        residual, groups = domain_masks([self.importance[n][site.layer] for n in self.names], self.keep)
        moe = moe_from_channels(ffn, groups, "pregate", {}, shared=residual)
        spec = {"kind": "moe", "num_experts": len(self.names), "d_ff": groups.shape[1], "router": "pregate",
                "router_args": {}, "activation": ffn.activation, "shared_d_ff": len(residual) or None,
                **bias_flags(ffn)}
        return moe, spec

    def attach(self, model: nn.Module, context: RoutingContext | None) -> dict:
        """The PreGate: in a GPT's config and ``pregate``, or on a Hugging Face model's forward."""
        if isinstance(model, GPT):
            model.config = replace(model.config, pregate={k: v for k, v in self.gate.config().items()
                                                          if k != "vocab_size"})
            model.pregate = self.gate
        else:
            attach_pregate(model, self.gate, context)
        return {"pregate": self.gate.config()}

    @classmethod
    def restore(cls, model: nn.Module, record: dict, context: RoutingContext | None) -> None:
        attach_pregate(model, PreGate(**record["pregate"]), context)


def refactor(model: nn.Module, domains: dict[str, Tensor], keep: float = 0.5, pregate: dict | None = None,
             run: Callable | None = None, min_tokens: int = MIN_CALIBRATION_TOKENS, seed: int = 0,
             progress: bool = False) -> nn.Module:
    """Read-ME: a converted copy of ``model`` with one always-on residual expert plus one expert per
    domain in every FFN, and a :class:`PreGate` (arguments ``pregate``: d_model, n_heads, d_ff...)
    choosing each token's expert for all layers. ``domains`` maps a domain name to its calibration
    token ids ``[num_sequences, seq_len]``. Untuned, the PreGate is random: run :func:`tune`."""
    return Refactor(domains, keep, pregate, run, min_tokens, seed, progress).convert(model)


# ----------------------------------------------------------------------------------- router distillation


def _expert_hidden(moe: MoE, x_TD: Tensor) -> tuple[Tensor | None, Tensor]:
    """``|hidden|`` of the residual expert ``[T, r]`` and of every routed expert ``[T, E, w]`` on ``x``."""
    ex = moe.experts
    h = torch.einsum("td,eod->teo", x_TD, ex.first_proj)
    if ex.first_bias is not None:
        h = h + ex.first_bias
    h = ex.act.apply(h).abs()
    res = None
    if moe.shared_expert is not None:
        s = moe.shared_expert
        up = s.up_proj(x_TD)
        res = (s.act.fn(s.gate_proj(x_TD)) * up if s.act.gated else s.act.fn(up)).abs()
    return res, h


def distillation_targets(moe: MoE, x_TD: Tensor) -> Tensor:
    """The official ``loss_func`` target scores ``dist [T, E]`` of one layer: each channel's graded
    rank among the token's channels (cutoffs at ranks N-1, 4N/5, 3N/5, 2N/5, N/5 with N the width of
    an expert, divided by 3N), summed over each expert's channels, centred and scaled by 10."""
    res, h = _expert_hidden(moe, x_TD)
    T, E, w = h.shape
    feat = h.reshape(T, E * w) if res is None else torch.cat([res, h.reshape(T, E * w)], dim=1)
    ranked = feat.sort(dim=1, descending=True).values
    n = w
    cuts = [n - 1, 4 * n // 5, 3 * n // 5, 2 * n // 5, n // 5]
    graded = sum((feat > ranked[:, r : r + 1]).float() for r in cuts) / (3 * n)
    dist = graded[:, -E * w :].view(T, E, w).sum(-1)
    return 10 * (dist - dist.mean())


def distillation_loss(logits_TE: Tensor, dist_TE: Tensor) -> Tensor:
    """``0.75 * CE(label smoothing 0.5, argmax target) + 0.25 * soft CE(softmax(target))`` (official code)."""
    hard = F.cross_entropy(logits_TE, dist_TE.argmax(-1), label_smoothing=0.5)
    soft = -(torch.softmax(dist_TE, -1) * torch.log_softmax(logits_TE, -1)).sum(-1).mean()
    return 0.75 * hard + 0.25 * soft


def _converted_moes(model: nn.Module) -> list[MoE]:
    moes = [m for m in model.modules() if isinstance(m, MoE) and getattr(m.gate, "name", "") == "pregate"]
    if not moes:
        raise ValueError("this model has no pre-gated MoE layer; convert it with moekit.convert.refactor")
    return moes


def router_loss(model: nn.Module, ids_BT: Tensor, run: Callable | None = None) -> tuple[Tensor, float]:
    """The PreGate's distillation loss on one batch (summed over layers) and its top-1 agreement with
    the per-layer targets. The backbone runs without gradients, routed by the current PreGate."""
    moes = _converted_moes(model)
    inputs: dict[int, Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
               for i, m in enumerate(moes)]
    try:
        with torch.no_grad():
            (run or default_run)(model, ids_BT)
            targets = [distillation_targets(m, inputs[i].reshape(-1, m.d_model).float()) for i, m in enumerate(moes)]
    finally:
        for h in handles:
            h.remove()
    logits = pregate_of(model)(ids_BT).reshape(-1, moes[0].num_experts)
    loss = sum(distillation_loss(logits, t) for t in targets)
    agree = sum(float((logits.argmax(-1) == t.argmax(-1)).float().mean()) for t in targets) / len(targets)
    return loss, agree


def _train_only(model: nn.Module, params: list[Tensor]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def _phase_loss(model: nn.Module, phase: str, x: Tensor, y: Tensor, lm_loss: Callable | None) -> tuple[Tensor, dict]:
    """The loss of one step of a phase, and what its record adds (the router's top-1 agreement)."""
    if phase == "router":
        loss, agree = router_loss(model, x)
        return loss, {"agree": agree}
    lm, aux = lm_and_aux(model, x, y, lm_loss)
    return lm + aux, {}


def _run_phase(model: nn.Module, batches: Callable, phase: str, steps: int, lr0: float, params: list[Tensor],
               weight_decay: float, lm_loss: Callable | None, first: int, rnd: int,
               record: Callable[[dict], None]) -> None:
    """``steps`` AdamW updates of ``params`` alone, warm-up then cosine from ``lr0`` (global steps from ``first``)."""
    _train_only(model, params)
    opt = torch.optim.AdamW(params, lr=lr0, weight_decay=weight_decay, betas=(0.9, 0.95))
    model.train()
    for i in range(steps):
        x, y = batches(first + i)
        lr = warmup_cosine(i, steps, lr0, max(1, steps // 10))
        loss, extra = _phase_loss(model, phase, x, y, lm_loss)
        rec = {"round": rnd, "phase": phase, "step": first + i, "loss": float(loss.detach()), **extra}
        optimizer_step(opt, loss, params, 1.0, lr)
        record({**rec, "lr": lr})


def tune(model: nn.Module, batches: Callable[[int], tuple[Tensor, Tensor]], rounds: int = 2, router_steps: int = 50,
         expert_steps: int = 100, router_lr: float = 5e-4, expert_lr: float = 5e-5, decay: float = 0.8,
         weight_decay: float = 0.01, lm_loss: Callable | None = None, progress: bool = True,
         log: Callable[[dict], None] | None = None) -> list[dict]:
    """Read-ME's alternating schedule: per round, ``router_steps`` of PreGate distillation (backbone
    frozen) then ``expert_steps`` of LM loss (PreGate frozen); cosine decay within a round and
    learning rates times ``decay`` per round. ``batches(step) -> (x, y)`` gives token ids and targets;
    ``lm_loss(model, x, y)`` defaults to ``model.loss(x, y)``. Returns one record per step.

    What follows the paper (Table 2, papers.md §2.5): the alternation, AdamW with weight decay 0.01,
    initial learning rates 5e-4 (router) and 5e-5 (experts) as defaults, cosine decay within a round,
    x0.8 per round. The paper's scale is 8 rounds of 100 router steps (batch 64) and 200 expert
    steps (batch 128); the defaults here (2 rounds, 50 + 100 steps) are ours, for CPU runs.

    Ours, not in the paper's schedule (and not verified in the official scripts): each phase warms up
    linearly over its first ``max(1, steps // 10)`` steps; the cosine ends at a floor of 0.1 x the
    phase's learning rate, not at 0 (:func:`moekit.train.schedule.warmup_cosine`); AdamW's betas are
    (0.9, 0.95) (PyTorch's default beta2 is 0.999); gradients are clipped to norm 1.0. The test suite
    pins this schedule (``tests/convert/test_refactor.py``)."""
    gate = pregate_of(model)
    gate_ids = {id(p) for p in gate.parameters()}
    trainable = {id(p): p.requires_grad for p in model.parameters()}  # restored at the end
    backbone = [p for p in model.parameters() if id(p) not in gate_ids and p.requires_grad]
    history: list[dict] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("Read-ME tuning", total=rounds * (router_steps + expert_steps))

        def record(rec: dict) -> None:
            history.append(rec)
            if log is not None:
                log(rec)
            bar.update(task, advance=1, description=f"Read-ME round {rec['round'] + 1}/{rounds} {rec['phase']} "
                                                    f"loss {rec['loss']:.3f}")

        for r in range(rounds):
            for phase, steps, lr0, params in (("router", router_steps, router_lr, list(gate.parameters())),
                                             ("experts", expert_steps, expert_lr, backbone)):
                if steps:
                    _run_phase(model, batches, phase, steps, lr0 * decay ** r, params, weight_decay, lm_loss,
                               len(history), r, record)
    for p in model.parameters():
        p.requires_grad_(trainable[id(p)])
    model.eval()
    return history
