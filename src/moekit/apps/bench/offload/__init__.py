"""`moekit bench offload`: expert-cache policies on real routing traces, and the served runtime.

1. The model (:mod:`.fixtures`): the demo's top-2 MoE (``runs/demo/variants/moe-top2/model`` after
   ``make demo``), or else one trained with the demo's settings and token count (357 steps of
   16 x 128) and kept in ``runs/bench/moe-top2``.
2. The trace: its routing on held-out validation text (whole sequences, token by token: the access
   stream of batch-1 decoding), recorded with :func:`moekit.offload.record_trace`.
3. Policies x budgets (25/50/75% of all experts' bytes) in the simulator (:mod:`.simulate`): hits,
   loads and bytes per token are exact counters, so they do not depend on this machine; every
   policy against Belady-MIN.
4. The runtime (:mod:`.serve`): the model served from an on-disk store through the cache (reads
   bypass the page cache), decoding held-out tokens: its counters must equal the simulator's on the
   same stream, its logits the in-memory model's; tokens/s and the time spent loading are measured.

:mod:`.run` runs it all; :mod:`.tables`, :mod:`.plots` and :mod:`.report` present a result.
"""

from moekit.apps.bench.offload.fixtures import demo_moe, readme_model
from moekit.apps.bench.offload.report import report_markdown
from moekit.apps.bench.offload.run import run_offload_bench
from moekit.apps.bench.offload.serve import SERVED, mixed_precision_check, serve_check
from moekit.apps.bench.offload.simulate import BUDGETS, POLICIES, readme_study, simulate_grid
from moekit.apps.bench.offload.tables import tables

__all__ = ["run_offload_bench", "simulate_grid", "serve_check", "mixed_precision_check", "demo_moe", "readme_model",
           "readme_study", "report_markdown", "tables", "POLICIES", "SERVED", "BUDGETS"]
