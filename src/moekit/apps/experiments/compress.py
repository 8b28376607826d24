"""`moekit experiment compress`: post-hoc compression of the demo's top-2 8-expert GPT (spec §7 at
this scale), every method at equal E' or equal average bits, against references trained from scratch.

Per seed, the base MoE (the demo's ``moe-top2``) is trained once and cached in the experiment folder
(``models/``; a rerun with the same settings skips training), then compressed from calibration
windows of the training split (disjoint from validation):

- E' in {6, 4}: pruning (random, hard counts, soft mass, REAP, NAEE, EASY-EP), merging (HC-SMoE
  average and single linkage, the same groups averaged uniformly, random groups), and SEER (heavy
  hitters, then fine-tuning with the router-entropy term, against the same fine-tuning without it);
- MC-MoE at equal average bits (2.5, 2.0): PMQ against uniform, error-only and frequency-only
  allocation (true packed bytes, scales and zero points included);
- ODP (per-layer calibration median) against one fixed threshold for all layers that prunes the
  same fraction of the second experts;
- domain pruning: REAP and hard counts to E'=4 from French-only, then English-only statistics
  (evaluated on every language);
- references: a MoE with E' experts and the dense model of matched active parameters, trained from
  scratch on the same tokens.

Measured: validation perplexity overall and per language, deduplicated bytes, CPU tokens/s of the
evaluation. Paper claims (compress-spec.md): REAP beats merging on generative loss (§4b); HC-SMoE
beats pruning baselines at equal E' (§1); PMQ beats uniform bits at 2.5 bits (§5).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from moekit.apps.experiments.lm import experts_per_token, settings, train_lm
from moekit.apps.experiments.output import print_table, write_results
from moekit.apps.presets import DemoSettings, base_config, default_variants, prepare_corpus
from moekit.apps.report import markdown_table, pyplot, save_figure
from moekit.compress import calibrate_odp, compress, dedup_bytes, domain_batches, mcmoe, seer_finetune, with_odp
from moekit.compress.mcmoe import QUANTIZERS
from moekit.io import kind_of
from moekit.models import GPT, GPTConfig
from moekit.models.gpt import MODEL_KIND
from moekit.train import evaluate

E_PRIMES = (6, 4)
#: label -> (registered method, settings besides num_experts)
AT_EQUAL_EXPERTS = {
    "prune-random": ("prune-random", {}), "prune-count": ("prune-count", {}), "prune-soft": ("prune-soft", {}),
    "reap": ("reap", {}), "naee": ("naee", {}), "easy-ep": ("easy-ep", {}),
    "hc-smoe (average)": ("hc-smoe", {"linkage": "average"}), "hc-smoe (single)": ("hc-smoe", {"linkage": "single"}),
    "merge-uniform": ("merge-uniform", {}), "merge-random": ("merge-random", {}),
}
BITS = (2.5, 2.0)
ALLOCATIONS = ("pmq", "uniform", "error", "frequency")
SEER_ENTROPY = 0.1
DOMAINS = ("fr", "en")
DOMAIN_METHODS = ("reap", "prune-count")
QUICK_STEPS = 10
FULL_STEPS = 400  # twice the other LM experiments' 200: an undertrained base makes fine-tuning look like repair
TRAIN_FILE = "train.json"  # the settings a cached model was trained with


def budget(quick: bool) -> tuple[DemoSettings, int]:
    """The demo's model/data settings and the training steps of every model (fewer than the other
    LM experiments in quick mode, where four models are trained per seed; more in full mode, so that
    the base is not so undertrained that any further training, compressed or not, improves it)."""
    s, _ = settings(quick)
    return s, QUICK_STEPS if quick else FULL_STEPS


def scale(quick: bool) -> dict:
    """Calibration windows, evaluation windows, fine-tuning steps and the quantization group."""
    return {"calibration": 8, "eval_chunks": 16, "finetune_steps": 4, "group": 32} if quick else \
        {"calibration": 64, "eval_chunks": 256, "finetune_steps": 50, "group": 64}


def cached_model(folder: Path, config: GPTConfig, data: tuple, s: DemoSettings, steps: int, seed: int) -> GPT:
    """The GPT of ``config`` trained for ``steps`` with ``seed``: loaded from ``folder`` when it was
    trained there with the same settings, else trained and saved there."""
    train, val = data
    record = {"config": config.to_dict(), "steps": steps, "seed": seed, "settings": s.__dict__}
    if kind_of(folder) == MODEL_KIND and (folder / TRAIN_FILE).is_file() and \
            json.loads((folder / TRAIN_FILE).read_text()) == json.loads(json.dumps(record)):
        return GPT.load(folder).eval()
    model, _, _ = train_lm(config, train, val, s, steps, seed, None, progress=False, name=folder.name)
    model.save(folder, files={TRAIN_FILE: json.dumps(record)})
    return model.eval()


def measure(model: GPT, val, s: DemoSettings, eval_chunks: int) -> dict:
    """Validation perplexity overall and per language, deduplicated bytes, evaluation tokens/s."""
    t0 = time.perf_counter()
    ev = evaluate(model, val, s.seq_len, 32, eval_chunks, label_fields=("language",))
    return {"val_ppl": ev.ppl, "ppl_by_language": ev.per_label["language"], "bytes": dedup_bytes(model),
            "tok_s": ev.tokens / (time.perf_counter() - t0)}


def pruned_fraction(model: GPT, val, s: DemoSettings) -> float:
    """The share of a top-2 model's expert assignments that are skipped on validation windows (each
    skip is a token's second expert: twice this share of the tokens lose theirs)."""
    layers = experts_per_token(model, val, s, 16)
    return 1 - statistics.mean(ly["mean_experts"] for ly in layers) / 2


def fixed_threshold(base: GPT, target: float, val, s: DemoSettings, iters: int = 10) -> tuple[GPT, float]:
    """The base model with ODP routers sharing one threshold, found by bisection so that it skips
    ``target`` of the second experts; returns the model and the threshold."""
    model = copy.deepcopy(base)
    with_odp(model)
    routers = [b.ffn.gate for b in model.blocks if hasattr(b.ffn, "gate")]
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        for r in routers:
            r.mu.fill_(mid)
        lo, hi = (mid, hi) if pruned_fraction(model, val, s) < target else (lo, mid)
    for r in routers:
        r.mu.fill_((lo + hi) / 2)
    return model, (lo + hi) / 2


class Rows(list):
    """The rows of one seed. A row that a previous run in the same folder measured with the same
    settings (``results.json``: steps, scale, seed, label and size) is taken from it instead of
    being computed again, so adding a method to the experiment reruns only what is new."""

    def __init__(self, seed: int, previous: dict[tuple, dict]) -> None:
        super().__init__()
        self.seed, self.previous, self.reused = seed, previous, 0

    def add(self, head: dict, make: Callable[[], dict]) -> dict:
        """Append ``head`` (label, family, size) with its measurements: the previous run's, else ``make()``'s."""
        old = self.previous.get((self.seed, *key(head)))
        self.reused += old is not None
        row = {**head, **(make() if old is None else {k: v for k, v in old.items() if k not in head})}
        self.append(row)
        return row


def expert_rows(rows: Rows, base: GPT, calib: list, data: tuple, s: DemoSettings, sc: dict) -> None:
    """Every method at E' in :data:`E_PRIMES`, and SEER with and without its entropy term."""
    train, val = data

    def compressed(method: str, n: int, extra: dict) -> dict:
        return measure(compress(copy.deepcopy(base), method, calib, num_experts=n, **extra), val, s, sc["eval_chunks"])

    def seer(n: int, entropy: float) -> dict:
        model = compress(copy.deepcopy(base), "seer", calib, num_experts=n)
        return measure(finetune(model, train, s, sc, rows.seed, entropy), val, s, sc["eval_chunks"])

    for n in E_PRIMES:
        for label, (method, extra) in AT_EQUAL_EXPERTS.items():
            family = "merge" if "merge" in method or "smoe" in method else "prune"
            rows.add({"label": label, "family": family, "experts": n},
                     lambda method=method, n=n, extra=extra: compressed(method, n, extra))
        for entropy in (SEER_ENTROPY, 0.0):
            rows.add({"label": f"seer + {sc['finetune_steps']} fine-tuning steps (entropy {entropy})",
                      "family": "fine-tuned", "experts": n}, lambda n=n, entropy=entropy: seer(n, entropy))


def finetune(model: GPT, train, s: DemoSettings, sc: dict, seed: int, entropy: float = 0.0) -> GPT:
    """The fine-tuning every fine-tuned row gets: the same steps, batches and learning rate."""
    seer_finetune(model, lambda step: train.batch(step, s.batch_size, s.seq_len, seed=seed + 1),
                  sc["finetune_steps"], entropy=entropy, lr=s.lr / 10)
    return model.eval()


def precision_rows(rows: Rows, base: GPT, calib: list, val, s: DemoSettings, sc: dict) -> None:
    """MC-MoE allocations at equal average bits with either quantizer; ODP against a fixed threshold
    at the same pruned fraction, and without its protected tokens."""
    def quantized(bits: float, allocation: str, quantizer: str) -> dict:
        model = copy.deepcopy(base)
        mcmoe(model, calib, bits=bits, allocation=allocation, group=sc["group"], quantizer=quantizer)
        return measure(model, val, s, sc["eval_chunks"])

    def odp(protect: float) -> dict:
        model = copy.deepcopy(base)
        with_odp(model, protect=protect)
        calibrate_odp(model, calib)
        return {"pruned": pruned_fraction(model, val, s), **measure(model, val, s, sc["eval_chunks"])}

    def fixed(target: float) -> dict:
        model, mu = fixed_threshold(base, target, val, s)
        return {"pruned": pruned_fraction(model, val, s), "mu": mu, **measure(model, val, s, sc["eval_chunks"])}

    for quantizer in QUANTIZERS:
        for bits in BITS:
            for allocation in ALLOCATIONS:
                rows.add({"label": f"mc-moe {allocation} ({quantizer})", "family": "mc-moe", "bits": bits},
                         lambda b=bits, a=allocation, q=quantizer: quantized(b, a, q))
    target = rows.add({"label": "odp (median per layer)", "family": "odp"}, lambda: odp(0.02))["pruned"]
    rows.add({"label": "median per layer, no protected tokens", "family": "odp"}, lambda: odp(0.0))
    rows.add({"label": "fixed threshold", "family": "odp"}, lambda: fixed(target))


def domain_rows(rows: Rows, base: GPT, train, tokenizer, val, s: DemoSettings, sc: dict) -> None:
    """REAP and hard-count pruning to E'=4 from one language's statistics, evaluated on every language."""
    n = min(E_PRIMES)
    for lang in DOMAINS:
        calib = None
        for method in DOMAIN_METHODS:
            def pruned(method=method, lang=lang) -> dict:
                nonlocal calib
                calib = calib or domain_batches(train.docs, tokenizer, "language", lang, s.seq_len, sc["calibration"])
                return measure(compress(copy.deepcopy(base), method, calib, num_experts=n), val, s, sc["eval_chunks"])

            rows.add({"label": f"{method} from {lang} only", "family": "domain", "experts": n}, pruned)


def reference_rows(rows: Rows, out: Path, corpus: tuple, s: DemoSettings, steps: int, sc: dict) -> None:
    """The MoEs with E' experts and the dense model trained from scratch on the same tokens, the
    MoEs also after the fine-tuning steps the fine-tuned methods get."""
    train, val, tokenizer = corpus
    base_cfg = base_config(s, tokenizer.get_vocab_size())
    for n in E_PRIMES:
        ref = cached_model(out / "models" / f"moe{n}_s{rows.seed}", base_cfg.with_moe(num_experts=n, k=2),
                           (train, val), s, steps, rows.seed)
        rows.add({"label": "trained from scratch", "family": "reference", "experts": n},
                 lambda ref=ref: {"active_params": ref.active_params(), **measure(ref, val, s, sc["eval_chunks"])})
        rows.add({"label": f"trained from scratch + {sc['finetune_steps']} fine-tuning steps", "family": "reference",
                  "experts": n}, lambda ref=ref: measure(finetune(ref, train, s, sc, rows.seed), val, s,
                                                         sc["eval_chunks"]))
    variants = {v.name: v.config for v in default_variants(base_cfg)}
    dense = cached_model(out / "models" / f"dense_s{rows.seed}", variants["dense"], (train, val), s, steps, rows.seed)
    rows.add({"label": "dense (matched active parameters)", "family": "reference"},
             lambda: {"active_params": dense.active_params(), **measure(dense, val, s, sc["eval_chunks"])})


def seed_rows(out: Path, seed: int, corpus: tuple, s: DemoSettings, steps: int, sc: dict,
              previous: dict[tuple, dict]) -> Rows:
    """Every row of one seed: the base, its compressions and the references trained from scratch."""
    train, val, tokenizer = corpus
    base_cfg = base_config(s, tokenizer.get_vocab_size())
    moe_cfg = {v.name: v.config for v in default_variants(base_cfg)}["moe-top2"]
    base = cached_model(out / "models" / f"moe8_s{seed}", moe_cfg, (train, val), s, steps, seed)
    calib = list(train.chunks(s.seq_len, sc["calibration"])[0].split(8))
    rows = Rows(seed, previous)
    rows.add({"label": "base (8 experts)", "family": "reference", "experts": 8},
             lambda: {"active_params": base.active_params(), **measure(base, val, s, sc["eval_chunks"])})
    rows.add({"label": f"base + {sc['finetune_steps']} fine-tuning steps", "family": "reference", "experts": 8},
             lambda: measure(finetune(copy.deepcopy(base), train, s, sc, seed), val, s, sc["eval_chunks"]))
    expert_rows(rows, base, calib, (train, val), s, sc)
    precision_rows(rows, base, calib, val, s, sc)
    domain_rows(rows, base, train, tokenizer, val, s, sc)
    reference_rows(rows, out, corpus, s, steps, sc)
    for r in rows:
        r["seed"] = seed
    return rows


def previous_rows(out: Path, steps: int, sc: dict) -> dict[tuple, dict]:
    """The rows of ``out/results.json`` by (seed, label, size) when it was written with ``steps`` and ``sc``."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("experiment") != "compress" or old.get("steps") != steps or old.get("scale") != sc:
        return {}
    return {(r["seed"], *key(r)): r for r in old.get("runs", [])}


def key(row: dict) -> tuple:
    """What rows of different seeds share: the method and its target size."""
    return row["label"], row.get("experts"), row.get("bits")


def summarize(runs: list[dict]) -> list[dict]:
    """Mean (and population SD of the perplexity) over seeds, per method and target size."""
    out = []
    for k in dict.fromkeys(key(r) for r in runs):
        rs = [r for r in runs if key(r) == k]
        langs = sorted({lang for r in rs for lang in r["ppl_by_language"]})
        row = {name: rs[0][name] for name in ("label", "family", "experts", "bits") if name in rs[0]}
        row.update(val_ppl=statistics.mean(r["val_ppl"] for r in rs),
                   val_ppl_sd=statistics.pstdev([r["val_ppl"] for r in rs]),
                   bytes=statistics.mean(r["bytes"] for r in rs), tok_s=statistics.mean(r["tok_s"] for r in rs),
                   ppl_by_language={lang: statistics.mean(r["ppl_by_language"][lang] for r in rs) for lang in langs})
        if "pruned" in rs[0]:
            row["pruned"] = statistics.mean(r["pruned"] for r in rs)
        out.append(row)
    return out


def size(row: dict) -> str:
    if "bits" in row:
        return f"{row['bits']} bits"
    if "pruned" in row:
        return f"{row['pruned']:.0%} of assignments ({2 * row['pruned']:.0%} of 2nd experts) skipped"
    return f"E'={row['experts']}" if "experts" in row else "dense"


def table_rows(summary: list[dict]) -> list[list[str]]:
    langs = sorted({lang for r in summary for lang in r["ppl_by_language"]})
    return [[r["label"], size(r), f"{r['bytes'] / 2**20:.2f}", f"{r['val_ppl']:.2f} ± {r['val_ppl_sd']:.2f}",
             *[f"{r['ppl_by_language'].get(lang, float('nan')):.2f}" for lang in langs], f"{r['tok_s']:,.0f}"]
            for r in summary]


def columns(summary: list[dict]) -> list[str]:
    langs = sorted({lang for r in summary for lang in r["ppl_by_language"]})
    return ["method", "size", "MB (dedup)", "val ppl", *[f"ppl {lang}" for lang in langs], "eval tok/s"]


def run(out: str | os.PathLike = "runs/experiments/compress", seeds: int = 3, quick: bool = False) -> dict:
    console = Console()
    t0 = time.perf_counter()
    out = Path(out)
    s, steps = budget(quick)
    sc = scale(quick)
    corpus = prepare_corpus(s, None, console)
    previous = previous_rows(out, steps, sc)
    runs, reused = [], 0
    for seed in range(seeds):
        rows = seed_rows(out, seed, corpus, s, steps, sc, previous)
        runs += rows
        reused += rows.reused
        console.print(f"seed {seed}: {len(rows)} rows, {rows.reused} from the previous results.json "
                      f"({time.perf_counter() - t0:.0f} s)")
    summary = summarize(runs)
    print_table(console, f"Compressing the demo's top-2 8-expert GPT ({steps} steps, {seeds} seeds)",
                columns(summary), table_rows(summary))
    result = {"experiment": "compress", "seeds": seeds, "steps": steps, "scale": sc, "summary": summary,
              "runs": runs, "rows_reused": reused, "wall_s": time.perf_counter() - t0}
    write_results(out, result, console, "compress.png", lambda path: plot(summary, path))
    return result


MARKERS = {"prune": "o", "merge": "s", "fine-tuned": "P", "mc-moe": "D", "odp": "v", "domain": "^", "reference": "*"}


def plot(summary: list[dict], path) -> None:
    """Validation perplexity against deduplicated bytes, one colour and marker per family of methods:
    every row on a log scale (left), and the rows near the base model, labelled (right)."""
    plt = pyplot()
    fig, (full, near) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.4]})
    colours = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(MARKERS)}
    base = next(r["val_ppl"] for r in summary if r["label"].startswith("base ("))
    for ax in (full, near):
        for family, marker in MARKERS.items():
            rs = [r for r in summary if r["family"] == family]
            ax.scatter([r["bytes"] / 2**20 for r in rs], [r["val_ppl"] for r in rs], marker=marker, s=36,
                       alpha=0.8, color=colours[family], label=family)
        ax.set_xlabel("deduplicated bytes (MB)")
        ax.grid(alpha=0.3)
    full.set_yscale("log")
    full.set_ylabel("validation perplexity")
    full.legend(fontsize=7)
    full.set_title("every method and size (mean over seeds)", fontsize=9)
    close = [r for r in summary if r["val_ppl"] < 1.1 * base]
    near.set_ylim(min(r["val_ppl"] for r in close) - 2, 1.1 * base)
    for i, r in enumerate(close):
        near.annotate(f"{r['label']} ({size(r)})", (r["bytes"] / 2**20, r["val_ppl"]), fontsize=4.5,
                      xytext=(4, (i % 3 - 1) * 3), textcoords="offset points")
    near.set_title("within 10% of the base model's perplexity", fontsize=9)
    fig.suptitle("Compression of the demo's top-2 8-expert GPT", fontsize=10)
    save_figure(fig, path)


def report_markdown(result: dict) -> str:
    summary = result["summary"]
    rows = table_rows(summary)
    return "\n".join([
        f"The demo's top-2 GPT with 8 experts, {result['steps']} steps, {result['seeds']} seeds, compressed from "
        f"{result['scale']['calibration']} training windows. Claims: REAP beats merging on LM loss; HC-SMoE beats "
        "the pruning baselines at equal E'; PMQ beats uniform bits at equal average bits.",
        "",
        markdown_table(columns(summary), rows),
    ])
