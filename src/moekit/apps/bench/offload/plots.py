"""The offload benchmark's figure: hit rate and bytes read per token of every simulated policy
against the cache budget."""

from __future__ import annotations

import os

from moekit.apps.bench.offload.simulate import POLICIES
from moekit.apps.report import pyplot, save_figure


def _style(label: str) -> str:
    """Dotted for the rules that compute misses from the store, dashed for the offline optimum."""
    return ":" if "bypass" in label or "Fiddler" in label else "--" if "MIN" in label else "-"


def plot(rows: list[dict], path: str | os.PathLike) -> None:
    """Two panels over the budgets of the simulated ``rows``: hit rate (%) and MiB read per token."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    for label, *_ in POLICIES:
        rs = [r for r in rows if r["policy"] == label]
        x = [100 * r["budget"] for r in rs]
        axes[0].plot(x, [100 * r["hit_rate"] for r in rs], _style(label), marker="o", label=label)
        axes[1].plot(x, [r["bytes_per_token"] / 2**20 for r in rs], _style(label), marker="o")
    axes[0].set_ylabel("hit rate (%)")
    axes[1].set_ylabel("MiB read per token")
    for ax in axes:
        ax.set_xlabel("cache budget (% of all experts' bytes)")
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=2, fontsize=7.5, frameon=False)
    fig.suptitle("expert cache policies on the routing of the demo's top-2 MoE (held-out text, batch-1 decode)",
                 fontsize=9)
    fig.subplots_adjust(bottom=0.3, wspace=0.25)
    save_figure(fig, path)
