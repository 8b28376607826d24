"""`moekit demo`: train and compare MoE variants on the bundled Wikipedia corpus, write a report.

Every variant is the same small Llama-style LM with a different FFN slot, trained on the same
batches for the same number of tokens at equal *active* parameters per token. The number of steps
is chosen by timing a few steps of each variant, so that the slowest one fits its share of the
wall-clock budget. Each variant is then measured: validation perplexity overall, per language
and per topic; prefill and decode tokens/s; resident parameter bytes; expert load.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from moekit.apps.bench.timing import keep_freed_memory
from moekit.apps.presets import FULL, QUICK, base_config, default_variants, prepare_corpus
from moekit.apps.report import markdown_table, plot_expert_load, plot_loss_curves, plot_tradeoffs
from moekit.data import TokenStream
from moekit.io import atomic_write, atomic_write_text, claim_folder, dumps, read_json, record_files, verify, verify_file
from moekit.models import GPT
from moekit.train import TrainConfig, Trainer, evaluate


def _step_time(model: GPT, data: TokenStream, cfg: TrainConfig, steps: int = 5) -> float:
    """Median seconds per training step of a throw-away model (after two warm-up steps)."""
    trainer = Trainer(model, data, None, replace(cfg, steps=steps + 2), progress=False)
    trainer.train_step()
    trainer.train_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_speed(model: GPT, vocab: int, seq_len: int, repeats: int = 3) -> dict:
    """Prefill tokens/s (batch 8 x seq_len) and decode tokens/s (batch 1, greedy, KV cache)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (8, seq_len), generator=g)
    pre = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model(prompt)
        pre.append(time.perf_counter() - t0)
    new = max(8, seq_len // 2)
    start = torch.randint(1, vocab, (1, seq_len - new), generator=g)
    dec = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.generate(start, new)
        dec.append(time.perf_counter() - t0)
    return {"prefill_tok_s": prompt.numel() / statistics.median(pre[1:]),
            "decode_tok_s": new / statistics.median(dec[1:])}


def _balance(loads: dict[str, dict]) -> float | None:
    """Mean over MoE layers of max/mean assignments per expert (1.0 = perfectly balanced)."""
    vals = []
    for d in loads.values():
        per_expert = torch.tensor(d["counts"], dtype=torch.float64).sum(0)
        if per_expert.sum() > 0:
            vals.append(float(per_expert.max() / per_expert.mean()))
    return statistics.mean(vals) if vals else None


EXPERIMENTS = {"dselect": ("DSelect-k in multi-task learning", "dselect", "dselect.png"),
               "dsmoe": ("DSMoE: sigmoid gates with STE", "dsmoe", "dsmoe.png"),
               "dynamic-k": ("DA-MoE: dynamic K from importance", "dynamic_k", "dynamic_k.png"),
               "convert-gpt": ("Dense to MoE: DSMoE partition and Read-ME refactor of the demo GPT vs pruning",
                               "convert_gpt", "convert_gpt.png"),
               "convert-minilm": ("Dense to MoE on a real pre-trained model: MiniLM partitioned vs pruned",
                                  "convert_minilm", "convert_minilm.png"),
               "mole-embeddings": ("MoLE: tied vs untied input/output embeddings (the demo ties them for every variant)",
                                   "mole_embeddings", "mole_embeddings.png")}


DEMO_KIND = "demo"
COMMITTED_EXPERIMENTS = Path("docs/experiments")  # the latest results, kept in the repository


def _section(title: str, command: str, candidates: list[Path], module: str, png: str, out: Path, sub: str) -> list[str]:
    """One results section: the first existing JSON of ``candidates`` rendered by ``module``'s
    ``report_markdown``, its figure (``png`` beside it) copied to ``out/sub``."""
    import importlib
    import shutil

    res = next((c for c in candidates if c.exists()), None)
    if res is None:
        return []
    verify_file(res, f"run `{command}` again")  # checked when an experiment folder of moekit's holds it
    result = read_json(res)
    render = importlib.import_module(f".{module}", __package__).report_markdown
    lines = [f"### {title}", "", f"`{command}` ({result['wall_s']:.0f} s; results from {res}).", "", render(result), ""]
    if (res.parent / png).exists():
        atomic_write(out / sub / png, lambda tmp: shutil.copyfile(res.parent / png, tmp))
        lines += [f"![{title}]({sub}/{png})", ""]
    return lines


def experiment_sections(experiments_dir: str | os.PathLike | None, out: Path) -> list[str]:
    """Markdown of each experiment's results, from ``experiments_dir`` or else the repository's
    ``docs/experiments``; figures are copied next to the report."""
    if experiments_dir is None:
        return []
    return [line for name, (title, module, png) in EXPERIMENTS.items()
            for line in _section(title, f"moekit experiment {name}",
                                 [Path(experiments_dir) / name / "results.json",
                                  COMMITTED_EXPERIMENTS / name / "results.json"],
                                 f"experiments.{module}", png, out, "experiments")]


BENCHES = {"offload": "Serving with too little memory: expert cache policies, prefetch, mixed precision, batching"}
COMMITTED_BENCHES = Path("docs/bench")


def bench_sections(out: Path, bench_dir: str | os.PathLike = "runs/bench") -> list[str]:
    """Markdown of the latest benchmark results that have a report (``runs/bench/NAME.json``, else
    the repository's ``docs/bench``); figures are copied next to the report."""
    return [line for name, title in BENCHES.items()
            for line in _section(title, f"moekit bench {name}", [Path(bench_dir) / f"{name}.json",
                                                                 COMMITTED_BENCHES / f"{name}.json"],
                                 f"bench.{name}", f"{name}.png", out, "bench")]


def run_demo(out: str | os.PathLike = "runs/demo", quick: bool = False, minutes: float | None = None,
             data: str | None = None, seed: int = 0, variants: list[str] | None = None,
             progress: bool = True, experiments_dir: str | os.PathLike | None = "runs/experiments") -> dict:
    """Train every variant, measure them, write ``report.md``, figures and ``results.json`` to ``out``.

    The results of ``moekit experiment ...`` found under ``experiments_dir`` are added to the report.
    """
    from rich.console import Console

    console = Console(quiet=not progress)
    t_start = time.perf_counter()
    keep_freed_memory()
    s = replace(QUICK if quick else FULL, **({"minutes": minutes} if minutes is not None else {}))
    if not s.minutes > 0:
        raise ValueError(f"demo: minutes must be > 0, got {s.minutes!r}")
    out = Path(out)
    torch.manual_seed(seed)
    if variants:  # names checked before any slow work
        names = [v.name for v in default_variants(base_config(s, s.vocab_size))]
        unknown = sorted(set(variants) - set(names))
        if unknown:
            raise ValueError(f"demo: unknown variants {unknown}; valid: {names}")
    claim_folder(out, DEMO_KIND, "--out")

    console.rule("moekit demo")
    train, val, tokenizer = prepare_corpus(s, data, console)
    base = base_config(s, tokenizer.get_vocab_size())
    all_variants = default_variants(base)
    if variants:
        all_variants = [v for v in all_variants if v.name in variants]
    cfg = TrainConfig(steps=1, batch_size=s.batch_size, seq_len=s.seq_len, lr=s.lr, seed=seed, log_every=5)

    # equal tokens for all: as many steps as the slowest variant fits into its share of the budget
    step_s = {}
    for v in all_variants:
        torch.manual_seed(seed)
        step_s[v.name] = _step_time(GPT(v.config), train, cfg)
    share = s.minutes * 60 / len(all_variants)
    steps = max(10, int(share / max(step_s.values())))
    warmup = max(1, steps // 20)
    eval_every = max(1, steps // s.curve_points)
    cfg = replace(cfg, steps=steps, warmup_steps=warmup, eval_every=eval_every, eval_chunks=32)
    tokens = steps * s.batch_size * s.seq_len
    console.print(f"budget {s.minutes:.2f} min for {len(all_variants)} variants: {steps} steps x "
                  f"{s.batch_size * s.seq_len} tokens = {tokens:,} tokens each "
                  f"(step times: {', '.join(f'{k} {v * 1e3:.0f} ms' for k, v in step_s.items())})")

    results, histories, loads_lang, loads_topic = [], {}, {}, {}
    for v in all_variants:
        torch.manual_seed(seed)
        model = GPT(v.config)
        t0 = time.perf_counter()
        trainer = Trainer(model, train, val, cfg, out_dir=out / "variants" / v.name, progress=progress, name=v.name,
                          files={"tokenizer.json": tokenizer.to_str()}, overwrite=True)  # for moekit generate
        history = trainer.train()
        train_s = time.perf_counter() - t0
        histories[v.name] = history
        model.save(out / "variants" / v.name / "model")
        params_total, extra = model.num_params(), {}
        if v.measure is not None:
            extra.update(v.measure(model, out / "variants" / v.name,
                                   lambda m: evaluate(m, val, s.seq_len, 32, s.eval_chunks).ppl))
        if v.serve is not None:  # measure what is served
            extra["val_ppl_train_form"] = evaluate(model, val, s.seq_len, 32, s.eval_chunks).ppl
            model = v.serve(model, out / "variants" / v.name)
            tables = {id(b.ffn.table): b.ffn.table for b in model.blocks if hasattr(b.ffn, "table")}
            extra["offloaded_mb"] = sum(t.manifest["bytes"] for t in tables.values()) / 2**20
        ev = evaluate(model, val, s.seq_len, 32, s.eval_chunks, label_fields=("language", "topic_en"))
        speed = measure_speed(model, base.vocab_size, s.seq_len)
        row = {
            "variant": v.name,
            "description": v.description,
            "params_total": params_total,
            "params_active": model.active_params(),
            "resident_mb": model.param_bytes() / 2**20,
            **extra,
            "val_loss": ev.loss,
            "val_ppl": ev.ppl,
            "ppl_by_language": ev.per_label["language"],
            "ppl_by_topic": ev.per_label["topic_en"],
            "train_s": train_s,
            "train_tok_s": tokens / train_s,
            **speed,
            "load_imbalance": _balance(ev.expert_load["language"]),
        }
        results.append(row)
        if ev.expert_load["language"]:
            loads_lang[v.name] = ev.expert_load["language"]
            loads_topic[v.name] = ev.expert_load["topic_en"]
        console.print(f"{v.name}: val ppl {ev.ppl:.2f}, decode {speed['decode_tok_s']:.0f} tok/s, "
                      f"prefill {speed['prefill_tok_s']:.0f} tok/s")

    figures = {
        "loss_curves": plot_loss_curves(histories, s.batch_size * s.seq_len, out / "loss_curves.png"),
        "tradeoffs": plot_tradeoffs(results, out / "tradeoffs.png"),
        "expert_load_language": plot_expert_load(loads_lang, "language", out / "expert_load_language.png"),
        "expert_load_topic": plot_expert_load(loads_topic, "topic", out / "expert_load_topic.png"),
    }
    summary = {
        "settings": {**s.__dict__, "steps": steps, "tokens_per_variant": tokens, "seed": seed,
                     "train_tokens_available": len(train), "validation_tokens": ev.tokens,
                     "corpus": data or "wiki (en, fr, es)"},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()},
        "results": results,
        "figures": {k: str(v.name) for k, v in figures.items() if v is not None},
        "wall_s": time.perf_counter() - t_start,
    }
    atomic_write_text(out / "results.json", dumps(summary, indent=2))
    atomic_write_text(out / "report.md", render_report(summary, experiment_sections(experiments_dir, out),
                                                       bench_sections(out)))
    record_files(out, DEMO_KIND, ["results.json", "report.md", *(v.name for v in figures.values() if v is not None),
                                  *_copied_figures(out)])
    console.print(f"report: {out / 'report.md'} ({summary['wall_s']:.0f} s)")
    return summary


def rerender_report(out: str | os.PathLike = "runs/demo",
                    experiments_dir: str | os.PathLike | None = "runs/experiments") -> Path:
    """Write ``out/report.md`` again from the demo's ``results.json`` and the latest experiment results
    (no training): for when an experiment was run after the demo."""
    out = Path(out)
    res = out / "results.json"
    if not res.exists():
        raise FileNotFoundError(f"{res}: missing; run `moekit demo --out {out}` first")
    verify(out, DEMO_KIND, f"run `moekit demo --out {out}` again", only=["results.json"])
    summary = read_json(res)
    path = atomic_write_text(out / "report.md", render_report(summary, experiment_sections(experiments_dir, out),
                                                              bench_sections(out)))
    record_files(out, DEMO_KIND, ["report.md", *_copied_figures(out)])
    return path


def _copied_figures(out: Path) -> list[str]:
    """The experiments' and benchmarks' figures copied beside the report."""
    return sorted(str(p.relative_to(out)) for sub in ("experiments", "bench") for p in (out / sub).glob("*.png"))


def results_table(results: list[dict]) -> str:
    langs = sorted({lang for r in results for lang in r["ppl_by_language"]})
    header = ["variant", "params (total / active)", "resident MB", "on disk MB", "val ppl", *[f"ppl {lang}" for lang in langs],
              "prefill tok/s", "decode tok/s", "expert load max/mean"]
    rows = []
    for r in results:
        rows.append([
            r["variant"], f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M", f"{r['resident_mb']:.1f}",
            f"{r['offloaded_mb']:.1f}" if "offloaded_mb" in r else "—", f"{r['val_ppl']:.2f}", *[f"{r['ppl_by_language'].get(lang, math.nan):.2f}" for lang in langs],
            f"{r['prefill_tok_s']:,.0f}", f"{r['decode_tok_s']:,.0f}",
            "—" if r["load_imbalance"] is None else f"{r['load_imbalance']:.2f}",
        ])
    return markdown_table(header, rows)


def mole_section(results: list[dict]) -> list[str]:
    rows = [[kind, f"{t['mb']:.2f}", f"{t['bytes_per_token']:,}", f"{t['val_ppl']:.2f}"]
            for r in results for kind, t in r.get("mole_tables", {}).items()]
    if not rows:
        return []
    return ["MoLE lookup tables, quantized after training (paper: NF4 keeps fp16 quality at about 25% of the size):",
            "", markdown_table(["table", "size MB", "bytes read per new token", "val ppl"], rows), ""]


def render_report(summary: dict, experiments: list[str] | None = None, benches: list[str] | None = None) -> str:
    s, results = summary["settings"], summary["results"]
    topics = sorted({t for r in results for t in r["ppl_by_topic"]})
    topic_rows = [[t, *[f"{r['ppl_by_topic'].get(t, math.nan):.2f}" for r in results]] for t in topics]
    figs = summary["figures"]
    lines = [
        "# moekit demo report",
        "",
        f"Corpus: {s['corpus']}; {s['train_tokens_available']:,} training tokens available, "
        f"{s['validation_tokens']:,} validation tokens evaluated. Tokenizer: byte-level BPE, {s['vocab_size']} tokens.",
        f"Model: d_model={s['d_model']}, {s['n_layers']} layers, {s['n_heads']} heads, sequence {s['seq_len']}. "
        f"Every variant: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} = {s['tokens_per_variant']:,} "
        f"training tokens, same batches, same seed (budget {s['minutes']} min for all variants).",
        f"Machine: torch {summary['machine']['torch']}, {summary['machine']['threads']} threads. "
        f"Whole run: {summary['wall_s']:.0f} s.",
        "",
        "## Results",
        "",
        results_table(results),
        "",
        "Perplexities are per token of the validation split (articles never seen in training). Speeds are",
        "fp32 on this CPU: prefill is a batch of 8 full sequences, decode is greedy generation at batch 1",
        "with a KV cache. Resident MB counts every parameter held in memory; on disk MB what is read from",
        "disk on demand (MoLE's lookup tables). Expert load is the busiest expert's share over the mean",
        "share, averaged over MoE layers (1.00 is perfectly balanced). Variants that are served in another",
        "form than they are trained in are measured as served:",
        *[f"- {r['variant']}: validation perplexity {r['val_ppl_train_form']:.2f} in training form, "
          f"{r['val_ppl']:.2f} as served" for r in results if "val_ppl_train_form" in r],
        "",
        *mole_section(results),
        "Variants:",
        *[f"- **{r['variant']}**: {r['description']}" for r in results],
        "",
        "## Perplexity by topic",
        "",
        markdown_table(["topic", *[r["variant"] for r in results]], topic_rows),
        "",
        "## Figures",
        "",
        *[f"![{k}]({v})" for k, v in figs.items()],
        "",
    ]
    if experiments:
        lines += ["## Experiments against the papers", "", *experiments]
    if benches:
        lines += ["## Benchmarks", "", *benches]
    return "\n".join(lines)
