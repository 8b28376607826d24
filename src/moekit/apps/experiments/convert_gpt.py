"""`moekit experiment convert-gpt`: dense -> MoE on the demo's GPT, against structured pruning.

The demo's dense GPT (width 128, 2 layers, context 64, 2048-token vocabulary, to fit 2 cores) is
pre-trained once; every variant then starts from it and is fine-tuned for the same number of LM
steps (the same batches, except Read-ME, which draws its own between its router rounds):

- structured pruning: keep the FFN channels with the largest mean |activation| (50%, and the
  fraction DSMoE ends up using);
- DSMoE (``partition``, contiguous blocks, ``SigmoidSTE``, sparsity 1/L as the paper);
- the same 8 blocks clustered by co-activation with a top-4 router fitted by least squares and
  fine-tuned (LLaMA-MoE style, exactly 50% active);
- Read-ME (``refactor``): the corpus's three languages as domains, top 50% channels per domain, a
  residual expert plus one expert per language, a PreGate trained by distillation in alternating
  router / expert rounds (the LM steps add up to the others').

Read-ME's tuning here is not the paper's: router LR 5e-3 and expert LR 3e-4 (the other variants'
fine-tuning LR), where Read-ME (Table 2) uses 5e-4 and 5e-5; 2 rounds of 30 router + 50 expert
steps (quick: 4 + 8) where the paper runs 8 rounds of 100 + 200; and ``tune``'s own warm-up, LR
floor, beta2 = 0.95 and gradient clipping (see ``moekit.convert.refactor.tune``). The larger rates
are ours, sized for runs of a few dozen CPU steps; the reported results come from these settings
and have not been rerun with the paper's.

Papers' claims: DSMoE beats pruning at equal activated parameters (LLaMA-1B PPL 7.41 vs 7.46-7.51);
Read-ME's refactored MoE beats a pruned dense model of the same active size (MMLU 38.9 vs 27.1,
lower perplexity on every domain).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace

import torch
from rich.console import Console

from moekit.apps.experiments.lm import settings
from moekit.apps.experiments.output import print_table, write_results
from moekit.apps.presets import DemoSettings, base_config, prepare_corpus
from moekit.apps.report import markdown_table, pyplot, save_figure
from moekit.convert import active_fraction, fit_routers, partition, prune, refactor, tune
from moekit.data import TokenStream
from moekit.models import GPT
from moekit.train import TrainConfig, Trainer, evaluate

E = 8
LANGS = ("en", "fr", "es")


def _domain_ids(stream, field_values: dict[str, str], seq_len: int, rows: int) -> dict[str, torch.Tensor]:
    """Calibration windows ``[rows, seq_len]`` of each language, cut from its documents' tokens."""
    langs = [d.language for d in stream.docs]
    out = {}
    for lang in field_values:
        keep = torch.tensor([x == lang for x in langs])[stream.doc.long()]
        ids = stream.ids[keep]
        n = min(rows, ids.numel() // seq_len)
        out[lang] = ids[: n * seq_len].view(n, seq_len)
    return out


def _finetune(model, train, s, steps, lr, seed, name):
    cfg = TrainConfig(steps=steps, batch_size=s.batch_size, seq_len=s.seq_len, lr=lr, seed=seed,
                      warmup_steps=max(1, steps // 20), log_every=5)
    return Trainer(model, train, None, cfg, name=name).train()


@torch.no_grad()
def _measure(model, val, s, eval_chunks) -> dict:
    ev = evaluate(model, val, s.seq_len, 32, eval_chunks, label_fields=("language",))
    x, _, _ = val.chunks(s.seq_len, 64)
    model.eval()
    model(x)
    frac = active_fraction(model, s.d_ff)
    rec = {"val_ppl": ev.ppl, "per_language": ev.per_label.get("language", {}),
           "active_fraction": 1.0 if frac != frac else frac}
    if getattr(model, "pregate", None) is not None:
        ids = model.pregate.route(x)
        rec["locality"] = float((ids[:, 1:] == ids[:, :-1]).float().mean())
        rec["expert_share"] = torch.bincount(ids.reshape(-1), minlength=model.pregate.num_experts).div(ids.numel()).tolist()
    return rec


@dataclass
class _Setup:
    """What every variant of a run starts from and is measured with."""

    s: DemoSettings
    train: TokenStream
    val: TokenStream
    dense: GPT
    domains: dict[str, torch.Tensor]  # language -> calibration windows
    calib: torch.Tensor  # all languages' windows
    eval_chunks: int
    ft_steps: int
    ft_lr: float
    router_steps: int
    console: Console

    def finetune(self, model, seed: int, name: str) -> list[dict]:
        return _finetune(model, self.train, self.s, self.ft_steps, self.ft_lr, seed, name)

    def ppl(self, model) -> float:
        return evaluate(model, self.val, self.s.seq_len, 32, self.eval_chunks).ppl

    def record(self, name: str, model, hist: list[dict], seed: int, **extra) -> dict:
        """The variant's measurements and loss curve, printed in one line."""
        rec = {"variant": name, "seed": seed, **_measure(model, self.val, self.s, self.eval_chunks), **extra,
               "history": [h for h in hist if "loss" in h]}
        self.console.print(f"{name}: val ppl {rec['val_ppl']:.2f}, active FFN {rec['active_fraction']:.2f}")
        return rec


def _dense_trained_on(st: _Setup, seed: int) -> dict:
    torch.manual_seed(seed)
    m = GPT(st.dense.config)
    m.load_state_dict(st.dense.state_dict())
    return st.record("dense (trained on)", m, st.finetune(m, seed, "dense"), seed)


def _dsmoe(st: _Setup, seed: int) -> dict:
    torch.manual_seed(seed)
    m = partition(st.dense, E, "sigmoid_ste", {"sparsity": 1.0 / st.s.n_layers})
    return st.record("DSMoE partition (STE, contiguous)", m, st.finetune(m, seed, "DSMoE"), seed)


def _top4_clustered(st: _Setup, seed: int) -> dict:
    torch.manual_seed(seed)
    m = partition(st.dense, E, "topk", {"k": E // 2, "scale": E / 2, "balance": 0.01, "z_loss": 0.0},
                  grouping="cluster", features="activations", calibration=st.calib, seed=seed)
    fit_routers(m, st.calib)
    before = st.ppl(m)
    return st.record("partition top-4 of 8 (clustered, fitted router)", m, st.finetune(m, seed, "top-4"), seed,
                     ppl_before=before)


def _readme(st: _Setup, seed: int) -> dict:
    torch.manual_seed(seed)
    m = refactor(st.dense, st.domains, keep=0.5, pregate={"d_model": 64, "n_heads": 4}, seed=seed)
    before = st.ppl(m)
    # Ours, not Read-ME's (Table 2: 8 rounds, 100 router steps at LR 5e-4, 200 expert steps at 5e-5):
    # 2 rounds, router LR 5e-3 (10x) and expert LR ft_lr = 3e-4 (6x), sized for a CPU budget.
    rounds = 2
    s, train = st.s, st.train
    hist = tune(m, lambda step: train.batch(step, s.batch_size, s.seq_len, seed + 7), rounds=rounds,
                router_steps=st.router_steps, expert_steps=st.ft_steps // rounds, router_lr=5e-3, expert_lr=st.ft_lr)
    agree = [h["agree"] for h in hist if "agree" in h][-st.router_steps:]
    return st.record("Read-ME refactor (3 languages)", m, hist, seed, ppl_before=before,
                     router_agreement=statistics.mean(agree) if agree else None)


def _pruned(st: _Setup, seed: int, keep: float, label: str) -> dict:
    torch.manual_seed(seed)
    m = prune(st.dense, keep, calibration=st.calib)
    before = st.ppl(m)
    rec = st.record(label, m, st.finetune(m, seed, label), seed, ppl_before=before, keep=keep)
    rec["active_fraction"] = keep
    return rec


def _seed_runs(st: _Setup, seed: int) -> list[dict]:
    """Every variant from the pre-trained dense model, then pruning to 50% and to DSMoE's fraction."""
    runs = [_dense_trained_on(st, seed), _dsmoe(st, seed)]
    ds_frac = runs[-1]["active_fraction"]
    runs += [_top4_clustered(st, seed), _readme(st, seed)]
    runs += [_pruned(st, seed, keep, label) for keep, label in ((0.5, "pruned to 50%"),
                                                                (ds_frac, f"pruned to DSMoE's {ds_frac:.0%}"))]
    return runs


def _setup(quick: bool, console: Console) -> tuple[_Setup, int, float]:
    """The corpus and the dense GPT pre-trained once: ``(setup, pre-training steps, its val ppl)``."""
    s, _ = settings(quick)
    if not quick:  # the demo's width, half its depth and context, a 2048-token vocabulary: ~15 min on 2 cores
        s = replace(s, vocab_size=2048, n_layers=2, seq_len=64)
    pre_steps, ft_steps, ft_lr = (30, 16, 3e-4) if quick else (200, 100, 3e-4)
    train, val, tok = prepare_corpus(s, None, console)
    eval_chunks = 48 if quick else 256
    torch.manual_seed(0)
    dense = GPT(base_config(s, tok.get_vocab_size()))
    _finetune(dense, train, s, pre_steps, s.lr, 1000, "pre-train dense")
    pre = evaluate(dense, val, s.seq_len, 32, eval_chunks).ppl
    console.print(f"pre-trained dense: val ppl {pre:.2f}")
    domains = _domain_ids(train, dict.fromkeys(LANGS), s.seq_len, 8 if quick else 32)
    st = _Setup(s, train, val, dense, domains, torch.cat(list(domains.values())), eval_chunks, ft_steps, ft_lr,
                4 if quick else 30, console)
    return st, pre_steps, pre


def summarize(runs: list[dict]) -> list[dict]:
    """Per variant, in the order they ran: the means over seeds."""
    summary = []
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        summary.append({"variant": v, "val_ppl": statistics.mean(r["val_ppl"] for r in rs),
                        "val_ppl_sd": statistics.pstdev([r["val_ppl"] for r in rs]),
                        "active_fraction": statistics.mean(r["active_fraction"] for r in rs),
                        "ppl_before": statistics.mean(r["ppl_before"] for r in rs) if "ppl_before" in rs[0] else None,
                        "locality": rs[0].get("locality"), "router_agreement": rs[0].get("router_agreement")})
    return summary


def run(out: str | os.PathLike = "runs/experiments/convert-gpt", seeds: int = 1, quick: bool = False) -> dict:
    console = Console()
    t0 = time.perf_counter()
    st, pre_steps, pre = _setup(quick, console)
    runs = [rec for seed in range(seeds) for rec in _seed_runs(st, seed)]
    summary = summarize(runs)
    print_table(console, f"dense GPT pre-trained {pre_steps} steps (val ppl {pre:.1f}), converted, then "
                f"{st.ft_steps} LM steps each ({seeds} seed{'s' if seeds > 1 else ''})",
                ("variant", "active FFN", "val ppl before tuning", "val ppl after"),
                [(row["variant"], f"{row['active_fraction']:.0%}",
                  "—" if row["ppl_before"] is None else f"{row['ppl_before']:.1f}",
                  f"{row['val_ppl']:.2f}" + (f" ± {row['val_ppl_sd']:.2f}" if seeds > 1 else "")) for row in summary])
    result = {"experiment": "convert-gpt", "seeds": seeds, "steps": st.ft_steps, "pretrain_steps": pre_steps,
              "pretrained_ppl": pre, "router_steps": st.router_steps, "finetune_lr": st.ft_lr, "summary": summary,
              "runs": runs, "wall_s": time.perf_counter() - t0}
    write_results(out, result, console, "convert_gpt.png", lambda path: plot(result, path))
    return result


def plot(result: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, row in enumerate(result["summary"]):
        marker = "s" if row["variant"].startswith("pruned") else "o"
        ax[0].scatter(row["active_fraction"], row["val_ppl"], color=f"C{i}", marker=marker, label=row["variant"])
    ax[0].set_xlabel("active fraction of the FFN per token")
    ax[0].set_ylabel("validation perplexity (after tuning)")
    ax[0].set_title("quality vs active FFN (squares: pruning)", fontsize=9)
    ax[0].legend(fontsize=6)
    for i, row in enumerate(result["summary"]):
        rs = [r for r in result["runs"] if r["variant"] == row["variant"] and r["seed"] == 0]
        if not rs:
            continue
        hist = rs[0]["history"]
        if any("phase" in h for h in hist):  # Read-ME logs every step of both phases: mean of 5 LM steps
            lm = [h["loss"] for h in hist if h["phase"] == "experts"]
            xs = list(range(5, len(lm) + 1, 5))
            ys = [sum(lm[x - 5 : x]) / 5 for x in xs]
        else:
            xs, ys = [h["step"] for h in hist], [h["loss"] for h in hist]
        ax[1].plot(xs, ys, color=f"C{i}", lw=1, label=row["variant"])
    ax[1].set_xlabel("LM fine-tuning step")
    ax[1].set_ylabel("training loss")
    ax[1].set_title("fine-tuning (seed 0)", fontsize=9)
    for a in ax:
        a.grid(alpha=0.3)
    save_figure(fig, path)


def report_markdown(result: dict) -> str:
    rows = [[r["variant"], f"{r['active_fraction']:.0%}", "—" if r["ppl_before"] is None else f"{r['ppl_before']:.1f}",
             f"{r['val_ppl']:.2f}", "—" if r.get("locality") is None else f"{r['locality']:.0%}"]
            for r in result["summary"]]
    return "\n".join([
        f"The demo's dense GPT pre-trained {result['pretrain_steps']} steps (val ppl {result['pretrained_ppl']:.1f}), "
        f"converted, then {result['steps']} LM fine-tuning steps per variant (Read-ME: the same number of LM steps in "
        f"2 expert rounds, plus {result['router_steps']} PreGate distillation steps per round). Papers: "
        "DSMoE beats pruning at equal activated parameters (LLaMA-1B PPL 7.41 vs 7.46-7.51); Read-ME beats a pruned "
        "dense model of the same active size (MMLU 38.9 vs 27.1); Read-ME tokens keep the previous token's expert "
        "2921 of 4096 times (71%).",
        "",
        markdown_table(["variant", "active FFN / token", "val ppl before tuning", "val ppl after tuning",
                        "same expert as previous token"], rows),
    ])
