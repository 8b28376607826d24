"""`moekit experiment meo`: task-level MEO (Merging Experts into One) in the demo's GPT, each sequence
gated by its language, against the same gate mixing its experts' outputs, a token-level top-2 MoE and
dense FFNs of one and two experts' compute.

Every expert of a layer starts as a copy of one FFN (the paper's experts start as copies of the
pre-trained dense weights, so that a merge starts exact). Every arm is trained from scratch on the same batches (each window from one language's documents,
rows drawn in proportion to the languages' tokens), with the same steps, schedule and seeds, and
evaluated on the same per-language validation windows. MEO's gate reads the language id, which is
known before the first token, so the LM stays causal (compress-spec.md §2: gating on the sequence
mean would leak later tokens). Paper claim (abstract): merging the selected experts cuts the FFN
FLOPs to one expert's (72.0G -> 28.6G) at little or no quality cost against the vanilla MoE; its
numbers are on GLUE with BERT, ours are language modelling at the demo's scale.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track

from moekit.apps.experiments.lm import settings
from moekit.apps.experiments.output import print_table, write_results
from moekit.apps.presets import DemoSettings, base_config, prepare_corpus
from moekit.apps.report import markdown_table, pyplot, save_figure
from moekit.data import TaskStreams
from moekit.data.corpus import by_split, load_corpus
from moekit.layer import aux_loss
from moekit.models import GPT, GPTConfig
from moekit.train.schedule import warmup_cosine
from moekit.train.step import optimizer_step

FIELD = "language"
EXPERTS, K = 8, 2
QUICK_STEPS = 12  # five models per seed


def arms(base: GPTConfig, num_tasks: int) -> dict[str, tuple[GPTConfig, int]]:
    """Name -> (config, FFN matmul width per token, in units of one expert's d_ff). The task-level
    gates are noise-free except in the last arm, Shazeer's noisy gate of the official code: with 3
    tasks its noise, not the task, picks the experts while the gate is small, and evaluation then
    runs pairs that rarely trained together (seed 0 tried once: 480 against 391 without noise)."""
    f = base.d_ff // 2
    meo = {"kind": "meo", "num_experts": EXPERTS, "k": K, "num_tasks": num_tasks, "d_ff": f, "noisy": False}
    return {
        f"dense (d_ff={f})": (GPTConfig(**{**base.to_dict(), "d_ff": f}), 1),
        f"dense (d_ff={base.d_ff})": (base, 2),
        f"token-level top-{K} MoE ({EXPERTS}x{f})": (base.with_moe(num_experts=EXPERTS, k=K, d_ff=f), K),
        f"task-level MoE, outputs mixed ({EXPERTS}x{f}, k={K})": (
            GPTConfig(**{**base.to_dict(), "ffn": [{**meo, "merge": False}] * base.n_layers}), K),
        f"MEO, weights merged ({EXPERTS}x{f}, k={K})": (
            GPTConfig(**{**base.to_dict(), "ffn": [meo] * base.n_layers}), 1),
        f"MEO, weights merged, noisy gate ({EXPERTS}x{f}, k={K})": (
            GPTConfig(**{**base.to_dict(), "ffn": [{**meo, "noisy": True}] * base.n_layers}), 1),
    }


def train(config: GPTConfig, data: TaskStreams, s: DemoSettings, steps: int, seed: int, name: str) -> tuple[GPT, float]:
    """AdamW with the demo's warm-up and cosine schedule; returns the model and training tokens/s."""
    torch.manual_seed(seed)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    for step in track(range(steps), description=name, transient=True):
        x, y, task = data.batch(step, s.batch_size, s.seq_len, seed=seed)
        loss = model.loss(x, y, task_ids=task) + aux_loss(model)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: the loss is {value} at step {step}; lower the learning rate")
        optimizer_step(opt, loss, model.parameters(), 1.0, warmup_cosine(step, steps, s.lr, max(1, steps // 20)))
    return model.eval(), steps * s.batch_size * s.seq_len / (time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: GPT, val: TaskStreams, s: DemoSettings, chunks: int, batch_size: int = 32) -> dict:
    """Perplexity overall and per task on ``chunks`` windows of each task."""
    x, y, task = val.chunks(s.seq_len, chunks)
    nll = torch.zeros(len(val.names), dtype=torch.float64)
    count = torch.zeros(len(val.names), dtype=torch.float64)
    for i in range(0, x.shape[0], batch_size):
        xb, yb, tb = x[i:i + batch_size], y[i:i + batch_size], task[i:i + batch_size]
        logits = model(xb, task_ids=tb).float()
        per_row = F.cross_entropy(logits.flatten(0, 1), yb.reshape(-1), reduction="none").view(yb.shape).sum(1)
        nll.index_add_(0, tb, per_row.double())
        count.index_add_(0, tb, torch.full_like(per_row, yb.shape[1], dtype=torch.float64))
    return {"val_ppl": math.exp(float(nll.sum() / count.sum())),
            "ppl_by_task": {n: math.exp(float(a / c)) for n, a, c in zip(val.names, nll, count, strict=True)}}


def task_streams(s: DemoSettings, console) -> tuple[TaskStreams, TaskStreams, int]:
    """Training and validation windows by language, and the vocabulary size (the demo's tokenizer)."""
    _, _, tokenizer = prepare_corpus(s, None, console)
    splits = by_split(load_corpus(None))
    docs = splits["train"]
    if s.max_train_docs and len(docs) > s.max_train_docs:
        docs = docs[:: math.ceil(len(docs) / s.max_train_docs)]
    return (TaskStreams.from_documents(docs, tokenizer, FIELD, "training data"),
            TaskStreams.from_documents(splits["validation"], tokenizer, FIELD, "validation data"),
            tokenizer.get_vocab_size())


def run(out: str | os.PathLike = "runs/experiments/meo", seeds: int = 3, quick: bool = False) -> dict:
    console = Console()
    t0 = time.perf_counter()
    s, steps = settings(quick)
    steps = QUICK_STEPS if quick else steps
    data, val, vocab = task_streams(s, console)
    data.check_fits(s.seq_len, "training data")
    base = base_config(s, vocab)
    chunks = 8 if quick else 96
    runs = []
    for seed in range(seeds):
        for name, (cfg, width) in arms(base, len(data.names)).items():
            model, tok_s = train(cfg, data, s, steps, seed, f"{name} s{seed}")
            runs.append({"arm": name, "seed": seed, "ffn_width": width, "params": model.num_params(),
                         "active_params": model.active_params(), "train_tok_s": tok_s,
                         **evaluate(model, val, s, chunks)})
        console.print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)")
    summary = summarize(runs)
    print_table(console, f"Task-level MEO in the demo's GPT ({steps} steps, {seeds} seeds, gate: {FIELD})",
                columns(summary), table_rows(summary))
    result = {"experiment": "meo", "seeds": seeds, "steps": steps, "eval_chunks_per_task": chunks,
              "tokens_per_step": s.batch_size * s.seq_len, "summary": summary, "runs": runs,
              "wall_s": time.perf_counter() - t0}
    write_results(out, result, console, "meo.png", lambda path: plot(runs, summary, path))
    return result


def summarize(runs: list[dict]) -> list[dict]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        tasks = sorted(rs[0]["ppl_by_task"])
        out.append({"arm": arm, "ffn_width": rs[0]["ffn_width"], "params": rs[0]["params"],
                    "active_params": rs[0]["active_params"],
                    "val_ppl": statistics.mean(r["val_ppl"] for r in rs),
                    "val_ppl_sd": statistics.pstdev([r["val_ppl"] for r in rs]),
                    "ppl_by_task": {t: statistics.mean(r["ppl_by_task"][t] for r in rs) for t in tasks},
                    "train_tok_s": statistics.median(r["train_tok_s"] for r in rs)})
    return out


def columns(summary: list[dict]) -> list[str]:
    return ["arm", "FFN compute / token", "params", "val ppl", *[f"ppl {t}" for t in summary[0]["ppl_by_task"]],
            "train tok/s"]


def table_rows(summary: list[dict]) -> list[list[str]]:
    return [[r["arm"], f"{r['ffn_width']} expert{'s' if r['ffn_width'] > 1 else ''}", f"{r['params'] / 1e6:.2f} M",
             f"{r['val_ppl']:.2f} ± {r['val_ppl_sd']:.2f}", *[f"{v:.2f}" for v in r["ppl_by_task"].values()],
             f"{r['train_tok_s']:,.0f}"] for r in summary]


def plot(runs: list[dict], summary: list[dict], path) -> None:
    """Validation perplexity of every seed against the FFN compute per token, one colour per arm."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, r in enumerate(summary):
        ys = [x["val_ppl"] for x in runs if x["arm"] == r["arm"]]
        xs = [r["ffn_width"] + 0.06 * (i - 2)] * len(ys)
        ax.scatter(xs, ys, s=22, color=plt.get_cmap("tab10")(i), label=r["arm"])
    ax.set_xticks([1, 2], ["1 expert's FFN", "2 experts' FFN"])
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Task-level MEO: quality against FFN compute per token (one point per seed)", fontsize=9)
    save_figure(fig, path)


def report_markdown(result: dict) -> str:
    summary = result["summary"]
    return "\n".join([
        f"The demo's GPT, {result['steps']} steps, {result['seeds']} seeds; MEO and the task-level MoE gate each "
        f"sequence on its {FIELD}. Claim (MEO): merging the selected experts keeps the quality of mixing their "
        "outputs at one expert's FFN compute.",
        "",
        markdown_table(columns(summary), table_rows(summary)),
    ])
