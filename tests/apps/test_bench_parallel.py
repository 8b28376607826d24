"""moekit bench parallel: the quick run."""

import json

from moekit.apps.bench.parallel import run_parallel_bench


def test_bench_parallel_quick(tmp_path):
    r = run_parallel_bench(out=tmp_path / "p.json", quick=True)
    assert [x["ratio"] for x in r["ranks"]] == [1.0, 1.0]  # no padding: exactly tokens x k x d x 4 bytes each way
    assert all(0 < x["off_rank_share"] < 1 for x in r["ranks"])
    assert r["single_process_step_s"] > 0 and json.loads((tmp_path / "p.json").read_text())["world"] == 2
