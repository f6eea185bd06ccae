"""The staged study (e2s2_jax/study_stages.py, e2s2_jax/stage_report.py): the paired statistics
against a hand computation, the verdicts and the sensitivity gate, the README section, the
settings guard, and every stage end to end at its smoke size (a few steps; the numbers mean
nothing), resumed without redoing a run."""

from __future__ import annotations

import json
import math

import pytest

from e2s2_jax import stage_report, study, study_common, study_sizes, study_stages
from e2s2_jax.ssr import job, spans


def _runs(values):
    """{arm: {task: {seed: {metric: value}}}} from {arm: {task: [value per seed]}}."""
    return {
        arm: {
            task: {str(s): {stage_report.HEADLINES[task]: v} for s, v in enumerate(vals)}
            for task, vals in by_task.items()
        }
        for arm, by_task in values.items()
    }


def test_paired_differences_against_a_hand_computation():
    runs = _runs(
        {
            "a": {"wiki_topic": [50.0, 47.0, 53.0], "kjv_to_web": [1.0, 2.0]},
            "b": {"wiki_topic": [40.0, 41.0, 42.0], "kjv_to_web": [1.0, 2.0, 3.0]},
        }
    )
    result = stage_report.paired_differences(runs, "a", "b")["tasks"]
    # wiki_topic: d = 10, 6, 11; mean 9; deviations 1, -3, 2; sum of squares 14;
    # sample variance 14 / 2 = 7; se = sqrt(7 / 3).
    topic = result["wiki_topic"]
    assert topic["diffs"] == [10.0, 6.0, 11.0]
    assert topic["mean"] == pytest.approx(9.0, rel=1e-15)
    assert topic["se"] == pytest.approx(math.sqrt(7.0 / 3.0), rel=1e-15)
    assert topic["outside_noise"]  # 9 > 2 * 1.53
    assert topic["metric"] == "accuracy" and topic["n"] == 3
    # kjv_to_web: only seeds 0 and 1 are in both arms; d = 0, 0: no difference at all.
    web = result["kjv_to_web"]
    assert web["seeds"] == [0, 1] and web["diffs"] == [0.0, 0.0]
    assert (web["mean"], web["se"], web["outside_noise"]) == (0.0, 0.0, False)
    # Another metric of the same runs, by name.
    runs["a"]["wiki_topic"]["0"]["cross_entropy"] = 2.5
    runs["b"]["wiki_topic"]["0"]["cross_entropy"] = 3.0
    other = stage_report.paired_differences(runs, "a", "b", "cross_entropy")["tasks"]
    assert (
        other["wiki_topic"]["diffs"] == [-0.5] and other["wiki_topic"]["metric"] == "cross_entropy"
    )


def test_noise_rule_and_verdicts():
    assert not stage_report.outside_noise(3.0, 2.0, 3)  # 3 < 2 * 2
    assert stage_report.outside_noise(-4.1, 2.0, 3)
    assert stage_report.outside_noise(1.0, 0.0, 3)  # every seed moved by the same amount
    assert not stage_report.outside_noise(1.0, 0.0, 1)  # one seed is never outside the noise
    entry = {"mean": 2.0, "se": 0.5, "n": 3, "metric": "bleu", "outside_noise": True}
    assert stage_report.verdict(entry).startswith("same direction as the paper (+2.00 ± 0.50")
    assert stage_report.verdict({**entry, "mean": -2.0}).startswith("opposite (-2.00")
    assert stage_report.verdict({**entry, "outside_noise": False}).startswith("within noise")


def test_sensitivity_gate_counts_tasks_ahead_outside_the_noise():
    tasks = ["kjv_to_sparv", "kjv_to_web", "wiki_summary", "wiki_topic", "spelling_grammar"]
    base = {t: [1.0, 1.0, 1.0] for t in tasks}
    ahead = {t: [3.0, 3.1, 2.9] for t in tasks[:2]}
    behind = {"wiki_summary": [-5.0, -5.1, -4.9]}  # outside the noise, but behind
    noisy = {t: [1.0, 9.0, -7.0] for t in tasks[3:]}
    runs = _runs({"span_corruption": {**base, **ahead, **behind, **noisy}, "random_init": base})
    comparison = stage_report.paired_differences(runs, "span_corruption", "random_init")
    gate = stage_report.sensitivity_verdict(comparison, tasks)
    assert gate["tasks_ahead"] == ["kjv_to_sparv", "kjv_to_web"] and not gate["passed"]
    runs = _runs(
        {"span_corruption": {**base, **ahead, **behind, "wiki_topic": [3.0, 3.1, 2.9]},
         "random_init": base}
    )  # fmt: skip
    comparison = stage_report.paired_differences(runs, "span_corruption", "random_init")
    assert stage_report.sensitivity_verdict(comparison, tasks)["passed"]
    # The same rule on the cross-entropy counts the tasks where pretraining is lower.
    line = stage_report.cross_entropy_line(comparison, tasks)
    assert line.endswith(
        "lower by more than 2 standard errors on 1 of 5 tasks measured (wiki_summary)"
    )


def test_a_stage_refuses_to_resume_with_other_settings(tmp_path):
    settings = study_stages.stage_settings("sensitivity", "smoke", study_sizes.SIZES["smoke"])
    study_common.check_settings(tmp_path, settings)
    study_common.check_settings(tmp_path, settings)  # the same settings resume
    with pytest.raises(SystemExit, match="finetune_steps"):
        study_common.check_settings(tmp_path, {**settings, "finetune_steps": 7})
    # A field no run of the stage depends on is not part of its settings.
    assert "translation_steps" not in settings and "finetune_steps" in settings


def test_stage_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        study.main(["--stage", "sensitivity", "--size", "quick"])
    assert "--stage needs --size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--size", "medium"])
    assert "give --stage" in capsys.readouterr().err


def _write_ssr_records(directory, count: int = 16) -> None:
    """Records in the job's own format whose fills are the original spans (a perfect
    generator: the smoke generator is too briefly trained to emit sentinels)."""
    directory.mkdir(parents=True)
    protos = []
    for i in range(count):
        text = f"It is a truth universally acknowledged, number {i}, that a man must be in want."
        example = job.Example(i, text, spans.sample_char_spans(text, 0, i), [], 0)
        fills = spans.span_texts(text, example.char_spans)
        protos.append(job.ssr_example_proto(example, fills, [-1.0] * len(fills)))
    (directory / "ssr-00000-of-00001-000000.tfrecord").write_bytes(job._serialize_tfrecords(protos))
    (directory / "summary.json").write_text(json.dumps({"examples": count + 4, "kept": count}))


def test_every_stage_runs_at_smoke_size_and_resumes(tmp_path, capsys):
    root = tmp_path / "smoke"
    for generator in ("large", "student"):
        _write_ssr_records(root / "runs" / "ssr_records" / generator)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{stage_report.README_BEGIN}\nold\n{stage_report.README_END}\ntail\n")
    common = [f"--out={tmp_path}", "--size=smoke", "--seeds=1", "--tasks=wiki_topic,kjv_to_web"]
    for stage in study_sizes.STAGES:
        assert study.main([*common, f"--stage={stage}"]) == 0
    results = {s: json.loads((root / s / "results.json").read_text()) for s in study_sizes.STAGES}
    for stage, result in results.items():
        assert result["status"] == "finished"
        for name in ("results.md", "differences.png", "curves.png"):
            assert (root / stage / name).stat().st_size > 0
        for comparison in result["comparisons"]:
            for dataset, entry in comparison["tasks"].items():
                arm = result["runs"][comparison["arm"]][dataset]["0"]
                reference = result["runs"][comparison["reference"]][dataset]["0"]
                assert entry["diffs"] == [arm[entry["metric"]] - reference[entry["metric"]]]
    assert results["sensitivity"]["tasks"] == ["wiki_topic", "kjv_to_web"]
    assert set(results["sensitivity"]["runs"]) == {"random_init", "span_corruption"}
    assert "gate" in results["sensitivity"]
    assert "teacher-forced test cross-entropy" in (root / "sensitivity" / "results.md").read_text()
    assert results["surface_fusion"]["tasks"] == ["kjv_to_web"]
    assert set(results["surface_fusion"]["runs"]) == set(study_stages.SURFACE_FUSION_ARMS)
    e2s2 = results["e2s2"]
    assert e2s2["tasks"] == [study_stages.PROBE, "wiki_topic"]
    for arm in ("warm_start", *study_stages.E2S2_ARMS):
        probe = e2s2["runs"][arm][study_stages.PROBE]["0"]
        assert 0.0 <= probe["probe_accuracy"] <= 1.0
    for arm in study_stages.E2S2_ARMS:
        assert len(e2s2["curves"][arm]["0"]) >= 1  # the continuation logged its loss
    ssr = results["ssr"]
    assert ssr["tasks"] == ["kjv_to_web"]
    assert ssr["generators"]["large"]["drop_rate"] == pytest.approx(4 / 20)
    assert "kept 16 of 20 windows, drop rate 20.0%" in (root / "ssr" / "results.md").read_text()
    # Resuming a finished stage redoes no run and gives the same results.
    capsys.readouterr()
    assert study.main([*common, "--stage=sensitivity", f"--readme={readme}"]) == 0
    assert "$ python -m e2s2_jax.main" not in capsys.readouterr().out
    again = json.loads((root / "sensitivity" / "results.json").read_text())
    assert again["runs"] == results["sensitivity"]["runs"]
    text = readme.read_text()
    assert text.startswith("# x\n") and text.endswith("tail\n") and "old" not in text
    for stage in study_sizes.STAGES:
        assert f"--stage {stage}" in text
