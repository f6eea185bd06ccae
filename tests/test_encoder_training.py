"""RTS, C-RTS and SLM train from their README commands (the tiny T5 1.1, the smoke recipe, the
bundled corpus, a short budget): each encoder term ends below its chance level (log 2 for the
replaced-token head, log |vocabulary| for SLM) while the decoder's loss falls, and each term is
logged by name with its accuracy and majority-class rate beside it.

Measured with this budget (2 shared cores): rts_loss 0.65 -> 0.40 (the label prior's entropy
at a 14% replaced share is 0.41; the accuracy sits at the majority rate, 0.86, this early),
slm_loss about 9.0 -> 6.x, nll_noised about 8.8 -> 6.x.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, LOG_EVERY = 48, 4
README_COMMAND = [
    "train",
    "--gin_file=gin/models/t5_1_1_tiny.gin",
    "--gin_file=gin/runs/pretrain.gin",
    "--gin_file=gin/runs/smoke.gin",
]


def train_argv(argv: list[str], steps: int = STEPS) -> list[str]:
    """`argv` with this file's short budget: 16 rows of 64/16 tokens, `steps` steps, a
    metrics line every LOG_EVERY steps, no evaluation."""
    return [
        *argv,
        f"--gin.TRAIN_STEPS={steps}",
        "--gin.BATCH_SIZE=16",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
        "--gin.optax.warmup_cosine_decay_schedule.warmup_steps=8",
        f"--gin.train.log_every={LOG_EVERY}",
        "--gin.train.eval_every=0",
        f"--gin.train.checkpoint_every={steps}",
    ]


def run_main(model_dir, argv: list[str]) -> dict[str, np.ndarray]:
    """`python -m e2s2_jax.main` in this process, from the repository; returns each metric
    of `MODEL_DIR/train_metrics.jsonl` over the logged steps."""
    import gin

    from e2s2_jax import main

    gin.clear_config()
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        assert main.main([*argv, f'--gin.MODEL_DIR="{model_dir}"']) == 0
    finally:
        os.chdir(cwd)
        gin.clear_config()
    records = [
        json.loads(line) for line in (model_dir / "train_metrics.jsonl").read_text().splitlines()
    ]
    assert records[-1]["step"] == int(next(a for a in argv if "TRAIN_STEPS" in a).split("=")[1])
    return {key: np.array([r[key] for r in records]) for key in records[0]}


def train(tmp_path, name: str, *extra: str) -> dict[str, np.ndarray]:
    """Runs the README command of gin/objectives/`name`.gin; returns its metrics."""
    argv = [*README_COMMAND, f"--gin_file=gin/objectives/{name}.gin", *extra]
    return run_main(tmp_path / name, train_argv(argv))


def check_term(
    metrics: dict, term: str, chance: float, nll: str = "nll_noised", last: int = 3
) -> None:
    """`term`'s loss, accuracy and majority rate are logged; its loss over the `last` logged
    steps is below `chance` and its first value, and the decoder's `nll` falls by 10%."""
    for suffix in ("_loss", "_accuracy", "_majority_rate"):
        assert np.all(np.isfinite(metrics[term + suffix])), term + suffix
    loss = metrics[f"{term}_loss"]
    assert loss[-last:].mean() < chance, (term, loss)
    assert loss[-last:].mean() < loss[0], (term, loss)
    decoder = metrics[nll]
    assert decoder[-last:].mean() < 0.9 * decoder[0], decoder


def test_rts_trains_below_chance(tmp_path):
    metrics = train(tmp_path, "rts")
    check_term(metrics, "rts", math.log(2))
    assert 0.8 < metrics["rts_majority_rate"].mean() < 0.9  # ~15% of the regular tokens swapped


def test_c_rts_trains_below_chance(tmp_path):
    from e2s2_jax import token_clusters
    from e2s2_jax.data.token_swaps import regular_id_mask
    from e2s2_jax.data.vocab import get_vocabulary

    vocabulary = get_vocabulary()
    embedding = np.random.default_rng(0).normal(size=(vocabulary.vocab_size, 16))
    clusters = token_clusters.token_clusters(embedding, regular_id_mask(vocabulary), 64)
    np.save(tmp_path / "clusters.npy", clusters)
    metrics = train(tmp_path, "c_rts", f'--gin.CLUSTER_FILE="{tmp_path / "clusters.npy"}"')
    check_term(metrics, "rts", math.log(2))


def test_slm_trains_below_chance(tmp_path):
    from e2s2_jax.data.vocab import get_vocabulary

    metrics = train(tmp_path, "slm")
    check_term(metrics, "slm", math.log(get_vocabulary().vocab_size))
    assert 0 < metrics["slm_majority_rate"].mean() < 0.2


def test_same_document_trains_below_chance(tmp_path):
    """The pair head needs a few hundred steps before it beats chance (the tiny model first
    learns the targets' wording): 600 steps here, the last 160 of them averaged."""
    argv = [*README_COMMAND, "--gin_file=gin/objectives/same_document.gin"]
    metrics = run_main(tmp_path / "same_document", train_argv(argv, steps=600))
    check_term(metrics, "same_document", math.log(3), nll="nll_masked", last=40)
    accuracy = metrics["same_document_accuracy"][-40:].mean()
    majority = metrics["same_document_majority_rate"][-40:].mean()
    assert accuracy > majority, (accuracy, majority)
    assert 0.3 < metrics["same_document_majority_rate"].mean() < 0.5  # balanced labels


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("--gin.SWAP_RATE=1.5", "encoder_view_task.swap_rate (Gin macro SWAP_RATE)=1.5: the "),
        ("--gin.SWAP_RATE=0.0", "must be in (0, 1)"),
    ],
)
def test_bad_swap_rate_stops_before_training(tmp_path, capsys, extra, expected):
    from test_main import _main_in_process

    argv = [*README_COMMAND, "--gin_file=gin/objectives/rts.gin", extra]
    code, stderr = _main_in_process(capsys, [*argv, f'--gin.MODEL_DIR="{tmp_path / "run"}"'])
    assert code == 2 and expected in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()


def stops_before_training(tmp_path, capsys, extra: list[str]) -> str:
    """Runs the README command with `extra`; asserts exit status 2, a one-line message and no
    run directory; returns the message."""
    from test_main import _main_in_process

    argv = [*README_COMMAND, *extra, f'--gin.MODEL_DIR="{tmp_path / "run"}"']
    code, stderr = _main_in_process(capsys, argv)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()
    return stderr


def test_cluster_file_for_another_vocabulary_stops_before_training(tmp_path, capsys):
    np.save(tmp_path / "small.npy", np.zeros(1100, np.int32))
    stderr = stops_before_training(
        tmp_path,
        capsys,
        ["--gin_file=gin/objectives/c_rts.gin", f'--gin.CLUSTER_FILE="{tmp_path / "small.npy"}"'],
    )
    assert "shape (1100,) but the vocabulary has 8100 ids" in stderr, stderr
