"""The demo's run: the settings and the training budget, every variant trained and measured, the
figures, ``results.json`` and the report."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from moekit.apps.bench.timing import keep_freed_memory
from moekit.apps.demo.measure import load_balance, measure_speed, step_time
from moekit.apps.demo.report import DEMO_KIND, copied_figures, write_report
from moekit.apps.presets import FULL, QUICK, DemoSettings, Variant, base_config, default_variants, prepare_corpus
from moekit.apps.report import plot_expert_load, plot_loss_curves, plot_tradeoffs
from moekit.data import TokenStream
from moekit.io import atomic_write_text, claim_folder, dumps, record_files
from moekit.models import GPT
from moekit.train import EvalResult, TrainConfig, Trainer, evaluate

#: training windows the variants' extra measurements calibrate on (e.g. the compressions of moe-top2)
CALIBRATION_WINDOWS = 32


def _settings(quick: bool, minutes: float | None, variants: list[str] | None) -> DemoSettings:
    """The preset with ``minutes`` applied; the budget and the variants' names checked."""
    s = replace(QUICK if quick else FULL, **({"minutes": minutes} if minutes is not None else {}))
    if not s.minutes > 0:
        raise ValueError(f"demo: minutes must be > 0, got {s.minutes!r}")
    if variants:
        names = [v.name for v in default_variants(base_config(s, s.vocab_size))]
        unknown = sorted(set(variants) - set(names))
        if unknown:
            raise ValueError(f"demo: unknown variants {unknown}; valid: {names}")
    return s


def _budget(variants: list[Variant], train: TokenStream, s: DemoSettings, seed: int, console) -> TrainConfig:
    """Equal tokens for all: as many steps as the slowest variant fits into its share of the budget."""
    cfg = TrainConfig(steps=1, batch_size=s.batch_size, seq_len=s.seq_len, lr=s.lr, seed=seed, log_every=5)
    step_s = {}
    for v in variants:
        torch.manual_seed(seed)
        step_s[v.name] = step_time(GPT(v.config), train, cfg)
    steps = max(10, int(s.minutes * 60 / len(variants) / max(step_s.values())))
    cfg = replace(cfg, steps=steps, warmup_steps=max(1, steps // 20), eval_every=max(1, steps // s.curve_points),
                  eval_chunks=32)
    console.print(f"budget {s.minutes:.2f} min for {len(variants)} variants: {steps} steps x "
                  f"{s.batch_size * s.seq_len} tokens = {steps * s.batch_size * s.seq_len:,} tokens each "
                  f"(step times: {', '.join(f'{k} {v * 1e3:.0f} ms' for k, v in step_s.items())})")
    return cfg


def _train_variant(v: Variant, data: tuple, cfg: TrainConfig, s: DemoSettings, out: Path, seed: int,
                   progress: bool) -> tuple[dict, list[dict], EvalResult]:
    """Train one variant, save it and measure what is served: ``(results row, history, evaluation)``."""
    train, val, tokenizer = data
    torch.manual_seed(seed)
    model = GPT(v.config)
    folder = out / "variants" / v.name
    t0 = time.perf_counter()
    trainer = Trainer(model, train, val, cfg, out_dir=folder, progress=progress, name=v.name,
                      files={"tokenizer.json": tokenizer.to_str()}, overwrite=True)  # for moekit generate
    history = trainer.train()
    train_s = time.perf_counter() - t0
    model.save(folder / "model")
    params_total, extra = model.num_params(), {}
    if v.measure is not None:
        calibration = list(train.chunks(s.seq_len, CALIBRATION_WINDOWS)[0].split(8))
        extra.update(v.measure(model, folder, lambda m, windows=s.eval_chunks: evaluate(m, val, s.seq_len, 32,
                                                                                        windows).ppl, calibration))
    if v.serve is not None:  # measure what is served
        extra["val_ppl_train_form"] = evaluate(model, val, s.seq_len, 32, s.eval_chunks).ppl
        model = v.serve(model, folder)
        tables = {id(b.ffn.table): b.ffn.table for b in model.blocks if hasattr(b.ffn, "table")}
        extra["offloaded_mb"] = sum(t.manifest["bytes"] for t in tables.values()) / 2**20
    ev = evaluate(model, val, s.seq_len, 32, s.eval_chunks, label_fields=("language", "topic_en"))
    speed = measure_speed(model, v.config.vocab_size, s.seq_len)
    tokens = cfg.steps * s.batch_size * s.seq_len
    row = {"variant": v.name, "description": v.description, "params_total": params_total,
           "params_active": model.active_params(), "resident_mb": model.param_bytes() / 2**20, **extra,
           "val_loss": ev.loss, "val_ppl": ev.ppl, "ppl_by_language": ev.per_label["language"],
           "ppl_by_topic": ev.per_label["topic_en"], "train_s": train_s, "train_tok_s": tokens / train_s, **speed,
           "load_imbalance": load_balance(ev.expert_load["language"])}
    return row, history, ev


def _figures(out: Path, s: DemoSettings, histories: dict, results: list[dict],
             evals: dict[str, EvalResult]) -> dict[str, Path]:
    """The loss curves, the trade-offs and the expert load by language and by topic (MoE variants)."""
    loads = {field: {name: ev.expert_load[field] for name, ev in evals.items() if ev.expert_load["language"]}
             for field in ("language", "topic_en")}
    figures = {
        "loss_curves": plot_loss_curves(histories, s.batch_size * s.seq_len, out / "loss_curves.png"),
        "tradeoffs": plot_tradeoffs(results, out / "tradeoffs.png"),
        "expert_load_language": plot_expert_load(loads["language"], "language", out / "expert_load_language.png"),
        "expert_load_topic": plot_expert_load(loads["topic_en"], "topic", out / "expert_load_topic.png"),
    }
    return {k: v for k, v in figures.items() if v is not None}


def run_demo(out: str | os.PathLike = "runs/demo", quick: bool = False, minutes: float | None = None,
             data: str | None = None, seed: int = 0, variants: list[str] | None = None,
             progress: bool = True, experiments_dir: str | os.PathLike | None = "runs/experiments") -> dict:
    """Train every variant, measure them, write ``report.md``, figures and ``results.json`` to ``out``.

    The results of ``moekit experiment ...`` found under ``experiments_dir`` are added to the report.
    """
    console = Console(quiet=not progress)
    t_start = time.perf_counter()
    keep_freed_memory()
    s = _settings(quick, minutes, variants)  # names checked before any slow work
    out = Path(out)
    torch.manual_seed(seed)
    claim_folder(out, DEMO_KIND, "--out")

    console.rule("moekit demo")
    train, val, tokenizer = prepare_corpus(s, data, console)
    chosen = [v for v in default_variants(base_config(s, tokenizer.get_vocab_size()))
              if not variants or v.name in variants]
    cfg = _budget(chosen, train, s, seed, console)
    results, histories, evals = [], {}, {}
    for v in chosen:
        row, histories[v.name], evals[v.name] = _train_variant(v, (train, val, tokenizer), cfg, s, out, seed, progress)
        results.append(row)
        console.print(f"{v.name}: val ppl {row['val_ppl']:.2f}, decode {row['decode_tok_s']:.0f} tok/s, "
                      f"prefill {row['prefill_tok_s']:.0f} tok/s")

    figures = _figures(out, s, histories, results, evals)
    tokens = cfg.steps * s.batch_size * s.seq_len
    summary = {
        "settings": {**s.__dict__, "steps": cfg.steps, "tokens_per_variant": tokens, "seed": seed,
                     "train_tokens_available": len(train), "validation_tokens": evals[chosen[-1].name].tokens,
                     "corpus": data or "wiki (en, fr, es)"},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()},
        "results": results,
        "figures": {k: str(v.name) for k, v in figures.items()},
        "wall_s": time.perf_counter() - t_start,
    }
    atomic_write_text(out / "results.json", dumps(summary, indent=2))
    write_report(out, summary, experiments_dir)
    record_files(out, DEMO_KIND, ["results.json", "report.md", *(v.name for v in figures.values()),
                                  *copied_figures(out)])
    console.print(f"report: {out / 'report.md'} ({summary['wall_s']:.0f} s)")
    return summary
