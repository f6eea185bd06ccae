"""The frozen-encoder linear probe: the fit is perfect on separable classes and at chance on
shuffled labels, the features are the masked mean of the final encoder output (against NumPy),
the `probe` command on a saved tiny model, and its refusal of a task whose targets are not
labels."""

from __future__ import annotations

import collections
import functools
import json
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale
from test_e2s2_training import tiny_config
from test_main import _main_in_process

from e2s2_jax import main, probe
from e2s2_jax.interop import params_io
from e2s2_jax.models.config import T5Config
from e2s2_jax.models.t5 import T5
from tasks import downstream

CLASSES = 4
FEATURES = 32
TRAIN_PER_CLASS = 30
TEST_PER_CLASS = 100


def _blobs(rng, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLASSES * per_class, FEATURES]` points around class centres 10 apart on the first axes
    (unit noise on every axis: the nearest other centre is 7 standard deviations beyond the
    midpoint), and their labels as text, balanced."""
    labels = np.repeat(np.arange(CLASSES), per_class)
    centres = 10.0 * np.eye(CLASSES, FEATURES)
    points = centres[labels] + rng.normal(size=(len(labels), FEATURES))
    return points.astype(np.float32), np.asarray([f"class {c}" for c in labels])


def test_probe_fit_separates_blobs_and_is_at_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    train_x, train_y = _blobs(rng, TRAIN_PER_CLASS)
    test_x, test_y = _blobs(rng, TEST_PER_CLASS)
    assert probe.fit_and_score(train_x, train_y, test_x, test_y) == 1.0

    # Labels shuffled on both splits carry nothing about the features. 120 train points in 32
    # dimensions are enough for the classifier to fit noise, so a fit that saw the test split
    # would score above chance here. Whatever it predicts, each test prediction matches its
    # shuffled balanced label with probability p = 1/k; over a random permutation of the n
    # labels the number of matches has mean n p and variance n p (1 - p) x n / (n - 1) at most
    # (Hoeffding's permutation variance; the most when the predictions are balanced): a
    # Binomial(n, p)'s, 0.25% more. So the accuracy lies within 4 standard deviations,
    # sqrt(p (1 - p) / n) each, of p but for a draw of probability ~6e-5 (the normal
    # approximation, close at n = 400 and n p = 100), and the seed fixes the draw.
    chance = 1 / CLASSES
    n = len(test_y)
    bound = 4 * math.sqrt(chance * (1 - chance) / n)
    accuracy = probe.fit_and_score(
        train_x, rng.permutation(train_y), test_x, rng.permutation(test_y)
    )
    assert abs(accuracy - chance) <= bound, (accuracy, chance, bound)


def test_a_test_label_unseen_in_training_counts_as_an_error():
    rng = np.random.default_rng(1)
    train_x, train_y = _blobs(rng, TRAIN_PER_CLASS)
    test_x, test_y = _blobs(rng, 10)
    test_y = np.where(test_y == "class 0", "a label never trained on", test_y)
    assert probe.fit_and_score(train_x, train_y, test_x, test_y) == pytest.approx(0.75)


def test_features_are_the_masked_mean_of_the_final_encoder_output():
    config = T5Config(
        vocab_size=64,
        d_model=32,
        num_heads=2,
        d_kv=8,
        d_ff=32,
        num_encoder_layers=2,
        num_decoder_layers=1,
    )
    model = T5(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, config.vocab_size, size=(4, 16)).astype(np.int32)
    lengths = np.asarray([16, 9, 3, 1])  # rows of padding after their tokens
    tokens[np.arange(16)[None, :] >= lengths[:, None]] = 0
    # The encoder's parameters (and the shared embedding) are all the features use.
    init = jax.jit(functools.partial(model.init, method=T5.encode))
    params = init(jax.random.key(0), tokens)["params"]

    features = np.asarray(probe.make_features_fn(model)(params, jnp.asarray(tokens)))

    encode = jax.jit(
        lambda params, tokens: model.apply({"params": params}, tokens, method=T5.encode)
    )
    encoded = np.asarray(encode(params, tokens).encoded)
    mask = (tokens != 0)[:, :, None]
    expected = (encoded.astype(np.float64) * mask).sum(axis=1) / mask.sum(axis=1)
    assert features.shape == (4, config.d_model) and features.dtype == np.float32
    # A float32 sum of n terms of magnitude <= M errs by at most (n - 1) eps n M (the standard
    # worst-case bound), so their mean by (n - 1) eps M plus one rounding of the mean (<= eps
    # M): n eps M in all, n <= 16 positions; and the features' program may fuse the final norm
    # otherwise than the reference's, a rounding or two of each encoder output: 2 eps M more.
    # In the unit of assert_close_to_scale, eps times the features' largest magnitude, that is
    # 18 M / max|features| (about 24 here; observed under 1).
    scale = np.max(np.abs(encoded)) / np.max(np.abs(expected))
    assert_close_to_scale(features, expected, ulps=(16 + 2) * scale)
    # The pad positions weigh nothing: not the plain mean over the row.
    assert not np.allclose(features[1], encoded[1].mean(axis=0), atol=1e-3)


@pytest.fixture
def tiny_params_dir(tmp_path):
    """A randomly initialised gin/models/t5_1_1_tiny.gin model saved as a params directory
    (what `restore_params` reads like a run's checkpoint; a training run costs ~40 s more)."""
    config = tiny_config()
    model = T5(config)
    tokens = jnp.ones((1, 1), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens, tokens)["params"]
    params_io.save_params(str(tmp_path / "tiny"), config, params)
    return tmp_path / "tiny"


def test_probe_command_end_to_end(tiny_params_dir, capsys):
    train_examples, test_examples = 48, 40
    argv = [
        "probe",
        "--gin_file=gin/models/t5_1_1_tiny.gin",
        "--gin_file=gin/runs/probe.gin",
        f'--gin.MODEL_DIR="{tiny_params_dir}"',
        '--gin.MIXTURE_OR_TASK_NAME="downstream_wiki_topic"',
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
        "--gin.BATCH_SIZE=16",
        f"--gin.probe.max_train_examples={train_examples}",
        f"--gin.probe.max_test_examples={test_examples}",
    ]
    gin.clear_config()
    try:
        code = main.main(argv)  # the command line's own function, in this process
    finally:
        gin.clear_config()
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    metrics = json.loads((tiny_params_dir / "probe_metrics.json").read_text())
    assert sorted(metrics) == [
        "checkpoint_step",
        "classes",
        "majority_accuracy",
        "probe_accuracy",
        "task",
        "test_examples",
        "test_split",
        "train_examples",
        "train_split",
    ]
    assert metrics["task"] == "downstream_wiki_topic"
    assert (metrics["train_split"], metrics["test_split"]) == ("train", "test")
    assert metrics["checkpoint_step"] is None  # an imported params directory has no step
    assert metrics["train_examples"] == train_examples
    assert metrics["test_examples"] == test_examples
    # The labels are the target texts: against the data files read directly.
    files = downstream.dataset_files("wiki_topic")
    train_labels = [t for _, t in downstream.read_tsv_examples(files["train"])[:train_examples]]
    test_labels = [t for _, t in downstream.read_tsv_examples(files["test"])[:test_examples]]
    assert metrics["classes"] == len(set(train_labels)) >= 2
    top_count = collections.Counter(train_labels).most_common(1)[0][1]
    majority_accuracies = {
        test_labels.count(label) / test_examples
        for label in set(train_labels)
        if train_labels.count(label) == top_count  # any of a tie
    }
    assert metrics["majority_accuracy"] in majority_accuracies, metrics
    for name in ("probe_accuracy", "majority_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0, metrics
        # Accuracies over the test examples read are multiples of 1/test_examples.
        correct = metrics[name] * test_examples
        assert correct == pytest.approx(round(correct)), metrics
    # 48 train examples fill 3 batches of 16; the 40 test ones end on a batch of 8 and 8 rows
    # of padding, whose features are dropped.
    assert f"probe features of train: {train_examples}/{train_examples} examples" in stdout
    assert f"probe features of test: {test_examples}/{test_examples} examples" in stdout
    assert f"accuracy {metrics['probe_accuracy']:.4f}" in stdout


LABELS_FIX = "set MIXTURE_OR_TASK_NAME to a classification task"


@pytest.mark.parametrize(
    "task, extra, expected",
    [
        ("downstream_kjv_to_web", [], ("downstream_kjv_to_web:train are not class", LABELS_FIX)),
        ("bundled_span_corruption", [], ("bundled_span_corruption:train are not", LABELS_FIX)),
        (
            "downstream_wiki_topic",
            ['--gin.probe.test_split="dev"'],
            ("probe.test_split='dev': downstream_wiki_topic has no such split; choose one of "
             "['test', 'train', 'validation'] with --gin.probe.test_split.",),
        ),
    ],
)  # fmt: skip
def test_probe_refuses_bad_input_before_the_restore(tmp_path, capsys, task, extra, expected):
    """Exit status 2 with one line, before any checkpoint is read (MODEL_DIR holds none)."""
    code, stderr = _main_in_process(
        capsys,
        ["probe", "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin_file=gin/runs/probe.gin",
         f'--gin.MODEL_DIR="{tmp_path}"', f'--gin.MIXTURE_OR_TASK_NAME="{task}"',
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
         "--gin.probe.max_train_examples=32", *extra],
    )  # fmt: skip
    assert code == 2, stderr[-3000:]
    assert len(stderr.strip().splitlines()) == 1, stderr
    for part in expected:
        assert part in stderr, stderr
    assert not (tmp_path / "probe_metrics.json").exists()
