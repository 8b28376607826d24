"""What every experiment ends with: its table printed on the console, ``results.json`` and its figure."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moekit.io import atomic_write_text, dumps


def print_table(console: Console, title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Print a table of ``columns`` with one line per row of ``rows`` (cells already formatted)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def write_results(out: str | os.PathLike, result: dict, console: Console, figure: str,
                  plot: Callable[[Path], None] | None) -> None:
    """``out/results.json`` and, with ``plot``, the figure ``out/figure``; say so with the run's wall time."""
    out = Path(out)
    atomic_write_text(out / "results.json", dumps(result))
    if plot is not None:
        plot(out / figure)
    console.print(f"wrote {out}/results.json and {figure} ({result['wall_s']:.0f} s)")
