"""DA-MoE in an encoder: the pre-trained all-MiniLM-L6-v2 (BERT, 6 layers, d 384) converted to 8
experts per FFN and fine-tuned to classify held-out Wikipedia summaries by topic (12 classes) and by
language (en/fr/es), against fixed top-2 and the dense model, with the importance DA-MoE's paper
suggests (the attention a token receives) and the one moekit's causal GPT uses (the attention a
token pays itself).

DA-MoE's method body is not public (papers.md §5): the importance signals, their normalisation and
the K rule are our design (``moekit.convert.importance``, ``moekit.routers.DynamicK``). Paper claim
(abstract): with an encoder on GLUE, attention-driven dynamic K beats the fixed top-k MoE baseline.

Set-up, the same for every arm: each FFN (1536 hidden channels) is cut into 8 contiguous experts of
192 channels (``moekit.convert.partition``). Partitioning rather than upcycling, because then K is
the share of the pre-trained FFN a token uses (top-2: a quarter), so giving important tokens more
experts has a first-order effect at equal mean compute; upcycled experts start as identical copies
whose renormalised mixture is the dense FFN for any K, so the arms would differ only by how far a
short fine-tune moves the copies apart. Routers start from the least-squares fit on training text
(``fit_routers``); the combine weights are rescaled to sum to the token's number of experts (each
chosen expert at about weight 1, as in the dense FFN the experts were cut from: ``TopK(scale=k)``,
applied to every MoE arm by the same router hook). Sequences are exactly ``seq_len`` tokens (shorter
summaries are left out), so no padding token enters the DA-MoE budget. Attention-probability dropout
is off in every arm (the importance is read from the attention itself). Two linear heads read the
mean-pooled last hidden state; the loss is the sum of the two cross-entropies plus the routers'
auxiliary losses; AdamW, one learning rate, the same batches and steps for every arm.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from rich.console import Console
from torch import Tensor, nn

from moekit.apps.experiments.convert_minilm import load_minilm
from moekit.apps.experiments.output import print_table
from moekit.convert import attach_importance, fit_routers, partition
from moekit.data import by_split, load_corpus
from moekit.layer import MoE, ZeroComputationExperts, aux_loss, routing_stats
from moekit.routers import MoEPP

E = 8
ZC = 4  # MoE++'s zero-computation experts: 1 zero, 1 copy, 2 constant
LANGUAGES = ("en", "fr", "es")
# full: sized from measured step times so that 5 arms x 3 seeds fit in about 25 minutes on 2 busy CPU cores
FULL = {"train": 1600, "test": 600, "seq_len": 48, "steps": 100, "batch": 16, "lr": 1e-4, "head_lr": 1e-3,
        "calib": 32}
QUICK = {"train": 64, "test": 32, "seq_len": 16, "steps": 3, "batch": 8, "lr": 1e-4, "head_lr": 1e-3, "calib": 32}
DATA_SEED = 1234


@dataclass(frozen=True)
class Arm:
    """One way to build the encoder: the router of its MoE layers (``None``: the dense FFN) and, for a
    router asking for it, the importance signal (``moekit.convert.attach_importance``)."""

    router: str | None = None
    router_args: dict = field(default_factory=dict)
    importance: str | None = None
    build: Callable[[nn.Module, Arm, Tensor], nn.Module] | None = None  # (dense, arm, calibration ids) -> encoder


DA_ARGS = {"k_min": 1, "k_max": 4, "budget": 2.0}
ARMS: dict[str, Arm] = {
    "dense": Arm(),
    "top-2": Arm("topk", {"k": 2}),
    "DA-MoE received": Arm("dynamic_k", DA_ARGS, "received"),
    "DA-MoE paid": Arm("dynamic_k", DA_ARGS, "paid"),
}


# ----------------------------------------------------------------------------------- data


@dataclass
class Split:
    ids: Tensor  # [N, seq_len]
    topic: Tensor  # [N]
    language: Tensor  # [N]


def _encode(docs, tok, seq_len: int, n: int, topics: list[str]) -> tuple[Split, int]:
    """The first ``n`` documents of ``docs`` with at least ``seq_len`` tokens, cut to ``seq_len``;
    also the number of documents looked at."""
    tok.enable_truncation(seq_len)
    rows, topic, lang, seen = [], [], [], 0
    for start in range(0, len(docs), 256):
        chunk = docs[start: start + 256]
        for d, enc in zip(chunk, tok.encode_batch([d.text for d in chunk])):
            seen += 1
            if len(enc.ids) == seq_len:
                rows.append(enc.ids)
                topic.append(topics.index(d.topic_en))
                lang.append(LANGUAGES.index(d.language))
            if len(rows) == n:
                break
        if len(rows) == n:
            break
    if len(rows) < n:
        raise ValueError(f"adaptive encoder: only {len(rows)} documents have {seq_len} tokens, need {n}")
    return Split(torch.tensor(rows), torch.tensor(topic), torch.tensor(lang)), seen


def load_data(s: dict, tok) -> tuple[Split, Split, list[str], dict]:
    """Training and held-out (``test`` split) summaries, shuffled once with a fixed seed."""
    splits = by_split(load_corpus())
    topics = sorted({d.topic_en for d in splits["train"]})
    out, kept = [], {}
    for name, n in (("train", s["train"]), ("test", s["test"])):
        docs = list(splits[name])
        random.Random(DATA_SEED).shuffle(docs)
        split, seen = _encode(docs, tok, s["seq_len"], n, topics)
        out.append(split)
        kept[name] = n / seen
    return out[0], out[1], topics, kept


# ----------------------------------------------------------------------------------- models


class Classifier(nn.Module):
    """An encoder and two linear heads (topic, language) on its mean-pooled last hidden state."""

    def __init__(self, encoder: nn.Module, topics: int, languages: int, seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        d = encoder.config.hidden_size
        self.topic, self.language = nn.Linear(d, topics), nn.Linear(d, languages)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(input_ids=ids).last_hidden_state.mean(dim=1)
        return self.topic(h), self.language(h)


def _weights_sum_to_k(router: nn.Module, args, output):
    """Router forward hook: each token's combine weights rescaled to sum to its number of experts."""
    k = torch.bincount(output.token, minlength=output.num_tokens).to(output.weight.dtype)
    output.weight = output.weight * k[output.token]
    return output


def _partitioned(dense: nn.Module, arm: Arm) -> nn.Module:
    model = partition(dense, E, router=arm.router, router_args=arm.router_args)
    for m in model.modules():
        if isinstance(m, MoE):
            m.gate.register_forward_hook(_weights_sum_to_k)
    return model


def _fitted(dense: nn.Module, arm: Arm, calib: Tensor) -> nn.Module:
    """Partitioned, with each router fitted to the experts' contributions on the calibration text."""
    model = _partitioned(dense, arm)
    if arm.importance is not None:
        attach_importance(model, arm.importance)
    fit_routers(model, [{"input_ids": b} for b in calib.split(8)])
    return model


def _moepp(dense: nn.Module, arm: Arm, calib: Tensor) -> nn.Module:
    """MoE++ on the partitioned FFN: the fitted top-2 router's rows for the 8 FFN experts, zero rows
    for 1 zero, 1 copy and 2 constant experts (paper's (8+4)E), so the model starts routing like
    top-2 and learns when a token needs less. No gating residual: the converted layers of a BERT
    are not chained by moekit's GPT, which passes it (our setting)."""
    model = _fitted(dense, Arm("topk", {"k": 2}), calib)
    for m in model.modules():
        if isinstance(m, MoE):
            fitted = m.gate.weight.detach()
            gate = MoEPP(**arm.router_args).bind(m.d_model, E + ZC)
            gate.set_expert_kinds(E, 1, 1, ZC - 2)
            with torch.no_grad():
                gate.weight.zero_()
                gate.weight[:E] = fitted
            m.gate, m.num_zc_experts = gate, ZC
            m.zc_experts = ZeroComputationExperts(m.d_model, 1, 1, ZC - 2)
            gate.register_forward_hook(_weights_sum_to_k)
    return model


ARMS["MoE++ (8+4), tau 0.75"] = Arm("moepp", {"k": 2, "tau": 0.75, "residual": False}, build=_moepp)


def build_encoder(dense: nn.Module, arm: Arm, calib: Tensor) -> nn.Module:
    """The arm's encoder from the dense MiniLM (eager attention, no attention dropout)."""
    return copy.deepcopy(dense) if arm.router is None else (arm.build or _fitted)(dense, arm, calib)


def base_encoder() -> tuple[nn.Module, object]:
    model, tok = load_minilm()
    model.set_attn_implementation("eager")
    for layer in model.encoder.layer:
        layer.attention.self.dropout.p = 0.0
    return model, tok


# ----------------------------------------------------------------------------------- train and evaluate


def train(clf: Classifier, data: Split, s: dict, seed: int) -> list[float]:
    """``s["steps"]`` AdamW steps on random batches (the same ones for every arm with this seed)."""
    heads = [*clf.topic.parameters(), *clf.language.parameters()]
    opt = torch.optim.AdamW([{"params": clf.encoder.parameters(), "lr": s["lr"]},
                             {"params": heads, "lr": s["head_lr"]}], weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    clf.train()
    losses = []
    for _ in range(s["steps"]):
        idx = torch.randint(0, data.ids.shape[0], (s["batch"],), generator=g)
        lt, ll = clf(data.ids[idx])
        loss = nn.functional.cross_entropy(lt, data.topic[idx]) + nn.functional.cross_entropy(ll, data.language[idx])
        opt.zero_grad(set_to_none=True)
        (loss + aux_loss(clf.encoder)).backward()
        nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate(clf: Classifier, data: Split, batch: int = 64) -> dict:
    """Accuracy per task, and FFN experts per token averaged over the MoE layers (``None`` if dense)."""
    clf.eval()
    right_t = right_l = 0
    assigned, tokens = 0.0, 0
    for i in range(0, data.ids.shape[0], batch):
        ids = data.ids[i: i + batch]
        lt, ll = clf(ids)
        right_t += int((lt.argmax(-1) == data.topic[i: i + batch]).sum())
        right_l += int((ll.argmax(-1) == data.language[i: i + batch]).sum())
        stats = routing_stats(clf.encoder)
        if stats:
            assigned += statistics.mean(r.mean_experts_per_token for r in stats.values()) * ids.numel()
            tokens += ids.numel()
    n = data.ids.shape[0]
    return {"topic_acc": right_t / n, "language_acc": right_l / n,
            "experts_per_token": assigned / tokens if tokens else None}


# ----------------------------------------------------------------------------------- the experiment


def _summary(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == name]
        entry = {"arm": name, "seeds": len(rs)}
        for key in ("topic_acc", "language_acc", "experts_per_token", "seconds"):
            vals = [r[key] for r in rs if r[key] is not None]
            entry[key] = statistics.mean(vals) if vals else None
            if key.endswith("_acc"):
                entry[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(entry)
    return out


def _cell(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def run_encoder(seeds: int = 3, quick: bool = False, console: Console | None = None,
                arms: dict[str, Arm] | None = None, threads: int | None = 1) -> dict:
    """Every arm x ``seeds`` seeds: ``{"settings", "rows", "summary", "kept", "wall_s"}`` (one row per
    arm and seed: accuracies, FFN experts per token, build + training + evaluation seconds).
    ``threads``: torch's intra-op threads for the run (restored after; ``None`` leaves them): one
    thread was faster than two on a shared 2-core machine (0.9 against 2.5 s per full-mode step)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(seeds, quick, console or Console(quiet=True), arms or ARMS)
    finally:
        torch.set_num_threads(before)


def _run(seeds: int, quick: bool, console: Console, arms: dict[str, Arm]) -> dict:
    s = dict(QUICK if quick else FULL)
    t0 = time.perf_counter()
    dense, tok = base_encoder()
    train_data, test_data, topics, kept = load_data(s, tok)
    calib = train_data.ids[: s["calib"]]
    rows = []
    for seed in range(seeds):
        for name, arm in arms.items():
            t = time.perf_counter()
            clf = Classifier(build_encoder(dense, arm, calib), len(topics), len(LANGUAGES), seed)
            losses = train(clf, train_data, s, seed)
            row = {"arm": name, "seed": seed, **evaluate(clf, test_data), "final_loss": losses[-1],
                   "seconds": time.perf_counter() - t}
            rows.append(row)
            console.print(f"{name} seed {seed}: topic {row['topic_acc']:.3f} language {row['language_acc']:.3f} "
                          f"experts/token {_cell(row['experts_per_token'])} ({row['seconds']:.0f} s)")
    summary = _summary(rows)
    print_table(console, "DA-MoE in MiniLM: held-out accuracy (mean over seeds)",
                ["arm", "topic acc", "language acc", "FFN experts/token", "s per run"],
                [[r["arm"], _cell(r["topic_acc"]), _cell(r["language_acc"]), _cell(r["experts_per_token"]),
                  f"{r['seconds']:.0f}"] for r in summary])
    return {"settings": {**s, "experts": E, "topics": topics, "languages": list(LANGUAGES), "seeds": seeds,
                         "quick": quick}, "kept": kept, "rows": rows, "summary": summary,
            "wall_s": time.perf_counter() - t0}
