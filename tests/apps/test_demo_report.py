"""The demo's report (moekit/apps/demo/report.py): its tables by hand, and a section for each
experiment and benchmark rendered by the experiment's own ``report_markdown``."""

import json

import pytest

from moekit.apps.cli.experiment import EXPERIMENTS as CLI_EXPERIMENTS
from moekit.apps.demo import rerender_report
from moekit.apps.demo.report import BENCHES, EXPERIMENTS, bench_sections, experiment_sections, render_report
from moekit.apps.experiments import dselect
from moekit.io import atomic_write_text, dumps


def _row(variant, **extra):
    return {"variant": variant, "description": f"the {variant}", "params_total": 2e6, "params_active": 1e6,
            "resident_mb": 8.0, "val_ppl": 12.345, "ppl_by_language": {"en": 10.0, "fr": 14.0},
            "ppl_by_topic": {"science": 11.0}, "prefill_tok_s": 12345.6, "decode_tok_s": 321.0,
            "load_imbalance": None, **extra}


def _summary(results):
    settings = {"corpus": "wiki", "train_tokens_available": 1000, "validation_tokens": 100, "vocab_size": 300,
                "d_model": 32, "n_layers": 1, "n_heads": 2, "seq_len": 16, "steps": 4, "batch_size": 2,
                "tokens_per_variant": 128, "minutes": 0.1}
    return {"settings": settings, "machine": {"torch": "2", "threads": 2}, "results": results,
            "figures": {"loss_curves": "loss_curves.png"}, "wall_s": 3.0}


def test_render_report_by_hand():
    results = [_row("dense"), _row("mole", offloaded_mb=1.5, val_ppl_train_form=12.0, load_imbalance=1.25,
                                   mole_tables={"nf4": {"mb": 0.5, "bytes_per_token": 256, "val_ppl": 13.0}})]
    md = render_report(_summary(results), ["### one experiment"], ["### one bench"])
    assert "| dense | 2.00M / 1.00M | 8.0 | — | 12.35 | 10.00 | 14.00 | 12,346 | 321 | — |" in md
    assert "| mole | 2.00M / 1.00M | 8.0 | 1.5 | 12.35 | 10.00 | 14.00 | 12,346 | 321 | 1.25 |" in md
    assert "- mole: validation perplexity 12.00 in training form, 12.35 as served" in md
    assert "| nf4 | 0.50 | 256 | 13.00 |" in md and "| science | 11.00 | 11.00 |" in md
    assert "Compressed after training" not in md
    moe = _row("moe-top2", compressed={"uncompressed": {"mb": 2.0, "val_ppl": 12.345},
                                       "reap, E'=4": {"mb": 1.25, "val_ppl": 14.0}})
    compressed = render_report(_summary([_row("dense"), moe]))
    assert "| moe-top2: uncompressed | 2.00 | 12.35 |" in compressed
    assert "| moe-top2: reap, E'=4 | 1.25 | 14.00 |" in compressed
    assert "## Experiments against the papers\n\n### one experiment" in md and "## Benchmarks\n\n### one bench" in md
    assert "## Experiments" not in render_report(_summary(results))


def test_every_experiment_has_a_section_rendered_by_its_module():
    assert set(EXPERIMENTS) == set(CLI_EXPERIMENTS)
    for name, section in EXPERIMENTS.items():
        assert section.render is CLI_EXPERIMENTS[name].report_markdown
    assert set(BENCHES) == {"offload"} and callable(BENCHES["offload"].render)


def test_a_section_shows_the_first_results_found_and_copies_the_figure(tmp_path):
    result = {"seeds": 1, "epochs": {"synthetic": 1}, "wall_s": 7.0,
              "summary": [{"dataset": "digits", "gate": "top-2", "metric": 0.5, "metric_sd": 0.0,
                           "metric_name": "accuracy", "nonzero_end": 2.0, "changed_end": 0.0}]}
    exp = tmp_path / "experiments"
    atomic_write_text(exp / "dselect" / "results.json", dumps(result))
    (exp / "dselect" / "dselect.png").write_bytes(b"\x89PNG fake")
    out = tmp_path / "demo"
    lines = experiment_sections(exp, out)
    text = "\n".join(lines)
    assert "### DSelect-k in multi-task learning" in text and "`moekit experiment dselect` (7 s;" in text
    assert dselect.report_markdown(result) in text
    assert "![DSelect-k in multi-task learning](experiments/dselect.png)" in text
    assert (out / "experiments" / "dselect.png").read_bytes() == b"\x89PNG fake"
    assert experiment_sections(None, out) == []
    assert bench_sections(out, tmp_path / "no-bench") == bench_sections(out, tmp_path / "none")


def test_rerender_report_needs_the_demos_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `moekit demo --out"):
        rerender_report(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps(_summary([_row("dense")])))
    with pytest.raises(Exception, match="moekit demo"):  # a results.json moekit did not write
        rerender_report(tmp_path)
