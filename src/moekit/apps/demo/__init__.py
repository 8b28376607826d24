"""`moekit demo`: train and compare MoE variants on the bundled Wikipedia corpus, write a report.

Every variant is the same small Llama-style LM with a different FFN slot, trained on the same
batches for the same number of tokens at equal *active* parameters per token. The number of steps
is chosen by timing a few steps of each variant, so that the slowest one fits its share of the
wall-clock budget. Each variant is then measured: validation perplexity overall, per language
and per topic; prefill and decode tokens/s; resident parameter bytes; expert load.

- :mod:`.run`: the budget, training and measuring every variant, the figures and ``results.json``.
- :mod:`.measure`: speed, step time and expert-load balance of one model.
- :mod:`.report`: ``report.md`` from the results, with the latest experiments' and benchmarks' sections.
"""

from moekit.apps.demo.report import rerender_report
from moekit.apps.demo.run import run_demo

__all__ = ["run_demo", "rerender_report"]
