"""The study's report: summary statistics, table, figures and README section, on made-up run
metrics."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from e2s2_jax import study_report


def _finetuned(values_by_variant):
    """{variant: {task: {seed: {metric: value}}}} from {variant: {task: [values]}}."""
    return {
        variant: {
            task: {str(seed): {study_report.HEADLINE[task]: v} for seed, v in enumerate(values)}
            for task, values in by_task.items()
        }
        for variant, by_task in values_by_variant.items()
    }


def test_summary_means_stds_and_noise_against_the_statistics_module():
    values = {
        "span_corruption": {"wiki_topic": [40.0, 42.0, 44.0], "kjv_to_web": [10.0, 10.5, 9.5]},
        "e2s2": {"wiki_topic": [50.0, 51.0, 52.0], "kjv_to_web": [10.2, 9.8, 10.9]},
    }
    summary = study_report.summarize(_finetuned(values), ["wiki_topic", "kjv_to_web"])
    for variant, by_task in values.items():
        for task, numbers in by_task.items():
            cell = summary[variant][task]
            assert cell["mean"] == pytest.approx(statistics.mean(numbers))
            assert cell["std"] == pytest.approx(statistics.stdev(numbers))
            assert cell["n"] == 3
    for task, outside in (("wiki_topic", True), ("kjv_to_web", False)):
        cell, base = summary["e2s2"][task], summary["span_corruption"][task]
        se = math.sqrt(cell["std"] ** 2 / 3 + base["std"] ** 2 / 3)
        assert cell["diff"] == pytest.approx(cell["mean"] - base["mean"])
        assert cell["diff_se"] == pytest.approx(se)
        assert cell["outside_noise"] is outside
    assert "diff" not in summary["span_corruption"]["wiki_topic"]


def test_one_seed_is_never_outside_the_noise():
    values = {"span_corruption": {"wiki_topic": [40.0]}, "e2s2": {"wiki_topic": [90.0]}}
    cell = study_report.summarize(_finetuned(values), ["wiki_topic"])["e2s2"]["wiki_topic"]
    assert cell["std"] == 0.0 and cell["outside_noise"] is False


def _results(summary_values):
    summary = study_report.summarize(_finetuned(summary_values), ["wiki_topic", "spelling_grammar"])
    return {
        "tasks": ["wiki_topic", "spelling_grammar"],
        "headline_metrics": {
            t: study_report.HEADLINE[t] for t in ("wiki_topic", "spelling_grammar")
        },
        "summary": summary,
        "seeds": [0, 1],
        "size": {
            "model_gin": "gin/models/t5_1_1_tiny.gin",
            "pretrain_steps": 10,
            "pretrain_batch": 4,
            "pretrain_lengths": [64, 16],
            "finetune_steps": 3,
            "finetune_batch": 4,
            "test_examples": 8,
        },
        "machine": "test",
        "date": "2026-12-01",
        "elapsed_s": 60.0,
        "pretraining_curves": {
            "span_corruption": {"0": [[1, 9.0], [2, 8.0]], "1": [[1, 9.2], [2, 7.5]]},
            "e2s2": {"0": [[1, 9.5], [2, 8.5]], "1": [[1, 9.1], [2, 8.0]]},
        },
    }


def test_markdown_table_shows_every_mean_and_difference():
    values = {
        "span_corruption": {"wiki_topic": [40.0, 44.0], "spelling_grammar": [20.0, 22.0]},
        "e2s2": {"wiki_topic": [50.0, 52.0], "spelling_grammar": [21.0, 21.5]},
    }
    results = _results(values)
    table = study_report.markdown_table(results)
    for by_task in values.values():
        for numbers in by_task.values():
            mean, std = np.mean(numbers), np.std(numbers, ddof=1)
            assert f"{mean:.2f} ± {std:.2f}" in table
    topic = results["summary"]["e2s2"]["wiki_topic"]
    assert f"{topic['diff']:+.2f} ± {topic['diff_se']:.2f}" in table


def test_figures_have_labelled_axes_and_the_data(tmp_path):
    values = {
        "span_corruption": {"wiki_topic": [40.0, 44.0], "spelling_grammar": [20.0, 22.0]},
        "e2s2": {"wiki_topic": [50.0, 52.0], "spelling_grammar": [21.0, 21.5]},
    }
    results = _results(values)
    curves = study_report.curves_figure(results)
    (axis,) = curves.axes
    assert axis.get_xlabel() and axis.get_ylabel()
    lines = {line.get_label(): line for line in axis.get_lines()}
    np.testing.assert_allclose(lines["span_corruption"].get_ydata(), [9.1, 7.75])
    bars = study_report.tasks_figure(results)
    for axis, task in zip(bars.axes, results["tasks"], strict=True):
        assert axis.get_xlabel() and axis.get_ylabel() and axis.get_title() == task
        heights = [patch.get_height() for patch in axis.patches]
        np.testing.assert_allclose(heights, [np.mean(values[v][task]) for v in values])
    paths = study_report.plot(results, tmp_path)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_section_replaces_only_the_marked_text_and_names_the_effects(tmp_path):
    values = {
        "span_corruption": {"wiki_topic": [40.0, 41.0], "spelling_grammar": [20.0, 22.0]},
        "e2s2": {"wiki_topic": [50.0, 51.0], "spelling_grammar": [21.0, 21.5]},
    }
    results = _results(values)
    results["size_name"] = "quick"
    # wiki_topic: +10 with s.e. 0.71 (outside); spelling_grammar: +0.25 with s.e. 1.03.
    assert study_report.noise_sentence(results).startswith(
        "1 of 2 differences from span_corruption are outside 2 s.e.: e2s2 on wiki_topic (+10.00)"
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# top\n{study_report.README_BEGIN}\nold numbers\n{study_report.README_END}\ntail\n"
    )
    study_report.update_readme(results, tmp_path / "study", readme)
    text = readme.read_text()
    assert text.startswith("# top\n") and text.endswith(f"{study_report.README_END}\ntail\n")
    assert "old numbers" not in text
    assert study_report.markdown_table(results).rstrip() in text
    assert "(study/tasks.png)" in text and "python -m e2s2_jax.study --quick" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no results markers"):
        study_report.update_readme(results, tmp_path / "study", readme)
