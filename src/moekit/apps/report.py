"""Figures and tables of the reports: the demo's figures, the matplotlib and PNG helpers every
experiment and benchmark plots with (matplotlib is imported on first use), and Markdown tables."""

from __future__ import annotations

import os
from pathlib import Path

from moekit.io import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically, and close it."""
    plt = pyplot()
    p = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return p


def plot_loss_curves(runs: dict[str, list[dict]], tokens_per_step: int, path) -> Path:
    """Training loss (and validation loss points) against tokens seen, one line per variant."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, history) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["step"] * tokens_per_step / 1e6, r["loss"]) for r in history if "loss" in r]
        val = [(r["step"] * tokens_per_step / 1e6, r["val_loss"]) for r in history if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, lw=1.2, alpha=0.85, label=f"{name} (train)")
        if val:
            ax.plot(*zip(*val), "o--", color=color, ms=4, lw=1, label=f"{name} (validation)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Loss curves (equal token budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_expert_load(loads: dict[str, dict[str, dict]], field: str, path) -> Path | None:
    """Heatmaps: for each MoE variant and layer, the share of each label's tokens sent to each expert."""
    import numpy as np

    panels = [(v, layer, d) for v, layers in loads.items() for layer, d in layers.items()]
    if not panels:
        return None
    plt = pyplot()
    n_labels = len(panels[0][2]["labels"])
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.32 * n_labels * rows + 1.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    im = None
    for ax, (variant, layer, d) in zip(axes.flat, panels):
        counts = np.asarray(d["counts"], dtype=float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=max(share.max(), 1e-9))
        ax.set_title(f"{variant} · {layer}", fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_xticks(range(share.shape[1]))
        ax.tick_params(labelsize=6)
        ax.set_yticks(range(len(d["labels"])))
        ax.set_yticklabels(d["labels"], fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="share of the label's assignments")
    fig.suptitle(f"Expert load by {field} (validation tokens)", fontsize=10, y=1.04)
    return save_figure(fig, path)


def plot_tradeoffs(rows: list[dict], path) -> Path:
    """Quality / speed / memory side by side: validation perplexity, decode tokens/s, resident MB."""
    plt = pyplot()
    names = [r["variant"] for r in rows]
    metrics = [("val_ppl", "validation perplexity (lower is better)"),
               ("decode_tok_s", "decode tokens/s (higher is better)"),
               ("resident_mb", "resident parameters, MB")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (key, title) in zip(axes, metrics):
        vals = [r[key] for r in rows]
        bars = ax.bar(range(len(vals)), vals, color=[f"C{i}" for i in range(len(vals))])
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Quality, speed and memory", fontsize=10, y=1.04)
    return save_figure(fig, path)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
