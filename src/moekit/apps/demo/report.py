"""The demo's ``report.md``: the variants' results, then a section for each experiment and benchmark
whose latest results are found (rendered by its own ``report_markdown``, its figure copied beside
the report)."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moekit.apps.bench import offload as offload_bench
from moekit.apps.experiments import (
    adaptive,
    compress,
    convert_gpt,
    convert_minilm,
    dselect,
    dsmoe,
    dynamic_k,
    meo,
    mole_embeddings,
)
from moekit.apps.report import markdown_table
from moekit.io import atomic_write, atomic_write_text, read_json, record_files, verify, verify_file

DEMO_KIND = "demo"
COMMITTED_EXPERIMENTS = Path("docs/experiments")  # the latest results, kept in the repository
COMMITTED_BENCHES = Path("docs/bench")


@dataclass(frozen=True)
class Section:
    """How the report shows one experiment's or benchmark's ``results.json``."""

    title: str
    render: Callable[[dict], str]
    figure: str  # the PNG written beside the results


EXPERIMENTS = {
    "dselect": Section("DSelect-k in multi-task learning", dselect.report_markdown, "dselect.png"),
    "dsmoe": Section("DSMoE: sigmoid gates with STE", dsmoe.report_markdown, "dsmoe.png"),
    "dynamic-k": Section("DA-MoE: dynamic K from importance", dynamic_k.report_markdown, "dynamic_k.png"),
    "convert-gpt": Section("Dense to MoE: DSMoE partition and Read-ME refactor of the demo GPT vs pruning",
                           convert_gpt.report_markdown, "convert_gpt.png"),
    "convert-minilm": Section("Dense to MoE on a real pre-trained model: MiniLM partitioned vs pruned",
                              convert_minilm.report_markdown, "convert_minilm.png"),
    "compress": Section("Compressing a trained MoE: pruning, merging and mixed precision at equal size",
                        compress.report_markdown, "compress.png"),
    "meo": Section("MEO: merging the selected experts into one FFN, gated by the language",
                   meo.report_markdown, "meo.png"),
    "adaptive": Section("Adaptive compute per token: MoE++ and DA-MoE in a decoder and an encoder",
                        adaptive.report_markdown, "adaptive.png"),
    "mole-embeddings": Section("MoLE: tied vs untied input/output embeddings (the demo ties them for every variant)",
                               mole_embeddings.report_markdown, "mole_embeddings.png"),
}
BENCHES = {
    "offload": Section("Serving with too little memory: expert cache policies, prefetch, mixed precision, batching",
                       offload_bench.report_markdown, "offload.png"),
}


def _section(section: Section, command: str, candidates: list[Path], out: Path, sub: str) -> list[str]:
    """One results section: the first existing JSON of ``candidates`` rendered by ``section``, its
    figure (beside the JSON) copied to ``out/sub``."""
    res = next((c for c in candidates if c.exists()), None)
    if res is None:
        return []
    verify_file(res, f"run `{command}` again")  # checked when an experiment folder of moekit's holds it
    result = read_json(res)
    lines = [f"### {section.title}", "", f"`{command}` ({result['wall_s']:.0f} s; results from {res}).", "",
             section.render(result), ""]
    png = section.figure
    if (res.parent / png).exists():
        atomic_write(out / sub / png, lambda tmp: shutil.copyfile(res.parent / png, tmp))
        lines += [f"![{section.title}]({sub}/{png})", ""]
    return lines


def experiment_sections(experiments_dir: str | os.PathLike | None, out: Path) -> list[str]:
    """Markdown of each experiment's results, from ``experiments_dir`` or else the repository's
    ``docs/experiments``; figures are copied next to the report."""
    if experiments_dir is None:
        return []
    return [line for name, section in EXPERIMENTS.items()
            for line in _section(section, f"moekit experiment {name}", [Path(experiments_dir) / name / "results.json",
                                                                         COMMITTED_EXPERIMENTS / name / "results.json"],
                                 out, "experiments")]


def bench_sections(out: Path, bench_dir: str | os.PathLike = "runs/bench") -> list[str]:
    """Markdown of the latest benchmark results that have a report (``runs/bench/NAME.json``, else
    the repository's ``docs/bench``); figures are copied next to the report."""
    return [line for name, section in BENCHES.items()
            for line in _section(section, f"moekit bench {name}", [Path(bench_dir) / f"{name}.json",
                                                                   COMMITTED_BENCHES / f"{name}.json"],
                                 out, "bench")]


def write_report(out: Path, summary: dict, experiments_dir: str | os.PathLike | None) -> Path:
    """Write ``out/report.md`` from the demo's ``summary`` and the latest experiments and benchmarks."""
    return atomic_write_text(out / "report.md", render_report(summary, experiment_sections(experiments_dir, out),
                                                              bench_sections(out)))


def copied_figures(out: Path) -> list[str]:
    """The experiments' and benchmarks' figures copied beside the report."""
    return sorted(str(p.relative_to(out)) for sub in ("experiments", "bench") for p in (out / sub).glob("*.png"))


def rerender_report(out: str | os.PathLike = "runs/demo",
                    experiments_dir: str | os.PathLike | None = "runs/experiments") -> Path:
    """Write ``out/report.md`` again from the demo's ``results.json`` and the latest experiment results
    (no training): for when an experiment was run after the demo."""
    out = Path(out)
    res = out / "results.json"
    if not res.exists():
        raise FileNotFoundError(f"{res}: missing; run `moekit demo --out {out}` first")
    verify(out, DEMO_KIND, f"run `moekit demo --out {out}` again", only=["results.json"])
    path = write_report(out, read_json(res), experiments_dir)
    record_files(out, DEMO_KIND, ["report.md", *copied_figures(out)])
    return path


def results_table(results: list[dict]) -> str:
    """The variants side by side: parameters, memory, perplexity (overall and per language), speed, load."""
    langs = sorted({lang for r in results for lang in r["ppl_by_language"]})
    header = ["variant", "params (total / active)", "resident MB", "on disk MB", "val ppl",
              *[f"ppl {lang}" for lang in langs], "prefill tok/s", "decode tok/s", "expert load max/mean"]
    rows = []
    for r in results:
        rows.append([
            r["variant"], f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M",
            f"{r['resident_mb']:.1f}", f"{r['offloaded_mb']:.1f}" if "offloaded_mb" in r else "—",
            f"{r['val_ppl']:.2f}", *[f"{r['ppl_by_language'].get(lang, math.nan):.2f}" for lang in langs],
            f"{r['prefill_tok_s']:,.0f}", f"{r['decode_tok_s']:,.0f}",
            "—" if r["load_imbalance"] is None else f"{r['load_imbalance']:.2f}",
        ])
    return markdown_table(header, rows)


def mole_section(results: list[dict]) -> list[str]:
    """MoLE's lookup tables in each precision: size, bytes read per token, perplexity."""
    rows = [[kind, f"{t['mb']:.2f}", f"{t['bytes_per_token']:,}", f"{t['val_ppl']:.2f}"]
            for r in results for kind, t in r.get("mole_tables", {}).items()]
    if not rows:
        return []
    return ["MoLE lookup tables, quantized after training (paper: NF4 keeps fp16 quality at about 25% of the size):",
            "", markdown_table(["table", "size MB", "bytes read per new token", "val ppl"], rows), ""]


def compression_section(results: list[dict]) -> list[str]:
    """The trained MoE compressed after training: perplexity and size next to the uncompressed model."""
    rows = [[f"{r['variant']}: {label}", f"{c['mb']:.2f}", f"{c['val_ppl']:.2f}"]
            for r in results for label, c in r.get("compressed", {}).items()]
    if not rows:
        return []
    return ["Compressed after training (`moekit compress`; calibration: 32 training windows; perplexity on 64 "
            "validation windows; sizes deduplicated, mc-moe's packed codes with their scales; see "
            "`moekit experiment compress` for every method and seeds):",
            "", markdown_table(["model", "size MB", "val ppl"], rows), ""]


def render_report(summary: dict, experiments: list[str] | None = None, benches: list[str] | None = None) -> str:
    """``report.md``'s text: the demo's ``summary``, then the experiments' and benchmarks' sections."""
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
        *compression_section(results),
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
