"""The study runner: its arguments, its reading of run logs, and the pipeline end to end at its
smoke size (a few steps of every stage; the numbers mean nothing)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from e2s2_jax import study


def test_read_curve_takes_the_loss_of_each_logged_step(tmp_path):
    path = tmp_path / "train_metrics.jsonl"
    rows = [{"step": 5, "loss": 3.0, "x": 1}, {"step": 10, "loss": 2.5}, {"step": 11}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study.read_curve(path) == [[5, 3.0], [10, 2.5]]


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        study.main(["--tasks", "no_such_task"])
    assert "no_such_task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--objectives", "mlm"])
    assert "mlm" in capsys.readouterr().err


def test_smoke_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    """Every stage at a few steps: pretraining (plain and E2S2), fine-tuning with and without
    SurfaceFusion, test metrics, table and plots; a printed command replays from a shell. (SSR
    needs a generator trained long enough to emit sentinels; its stages run in the --quick
    study.)"""
    argv = [
        "--size=smoke",
        f"--out={tmp_path}",
        "--seeds=1",
        "--tasks=spelling_grammar,wiki_topic",
        "--objectives=span_corruption,e2s2_denoise_only",
    ]
    assert study.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["variants"] == [
        "span_corruption",
        "e2s2_denoise_only",
        "span_corruption+surface_fusion",
    ]
    for variant in results["variants"]:
        for task, metric in (("spelling_grammar", "edit_f0.5"), ("wiki_topic", "accuracy")):
            metrics = results["finetune"][variant][task]["0"]
            assert 0.0 <= metrics[metric] <= 100.0
            saved = tmp_path / "runs/finetune" / variant / "seed0" / task / "test_metrics.json"
            assert json.loads(saved.read_text()) == metrics
    for objective in results["objectives"]:
        assert len(results["pretraining_curves"][objective]["0"]) >= 2
    for name in ("results.md", "pretraining_curves.png", "tasks.png"):
        assert (tmp_path / name).stat().st_size > 0
    # A printed command replays in a fresh process (the study's tasks come from the Gin file it
    # names, not from this process) and gives the same test metrics.
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 + 3 * 2 * 2  # pretrain x 2; (train, eval) x 3 variants x 2 tasks
    eval_argv = shlex.split(next(c for c in commands if "e2s2_jax.main eval " in c))[4:]
    assert eval_argv[1] == "--gin_file=gin/tasks/study.gin"
    model_dir = next(a for a in eval_argv if a.startswith("--gin.MODEL_DIR="))[17:-1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    replay = subprocess.run(
        [sys.executable, "-m", "e2s2_jax.main", *eval_argv],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert replay.returncode == 0, replay.stderr[-3000:]
    in_process, replayed = [
        json.loads(line)
        for line in (Path(model_dir) / "eval_metrics.jsonl").read_text().splitlines()
    ]
    assert replayed == in_process
    # A rerun finds every run finished and reproduces the results from the saved metrics.
    assert study.main(argv) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["finetune"] == results["finetune"]
    assert again["summary"] == results["summary"]
    # Other settings into the same directory are refused, not mixed with these runs.
    with pytest.raises(SystemExit, match="other study settings"):
        study.main([*argv[1:], "--size=quick"])
