"""A frozen-encoder linear probe (`python -m e2s2_jax.main probe`): how much of a classification
task a checkpoint's encoder already represents, measured by a logistic regression on each
example's mean-pooled final encoder output (fitted on the train split, scored on the test split).
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence

import gin
import jax
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from e2s2_jax.console import console
from e2s2_jax.errors import ConfigError
from e2s2_jax.inference import pad_rows, target_text
from e2s2_jax.interop import params_io
from e2s2_jax.models.heads import segment_mean_pool
from e2s2_jax.models.t5 import T5
from e2s2_jax.training import partitioning
from e2s2_jax.training.checkpoints import restore_params
from e2s2_jax.training.input_pipeline import check_split, task_examples

Array = jax.Array

# A task's targets are class labels when there are 2 to MAX_CLASSES distinct ones and each
# appears at least twice on average in the train examples read (every target distinct is a
# generation task, such as translation or span corruption, however few examples are read).
MAX_CLASSES = 1000
# sklearn's default solver (lbfgs, L2 penalty C=1, which keeps the optimum finite even where the
# classes separate) reached its tolerance after 63 iterations on the tiny model's wiki_topic
# features (8021 x 64, 12 classes) and after 11-15 on synthetic 8000 x 512 / 768 ones: near
# sklearn's default cap of 100, too close for other models' features. 5000 leaves two orders of
# magnitude to spare at a fraction of a second per iteration at those sizes; a fit that still
# reaches it gets a warning with its accuracy.
MAX_ITER = 5000
PROGRESS_EVERY = 20  # batches between progress lines of the feature extraction


def pooled_encoder_outputs(model: T5, params, encoder_input_tokens: Array) -> Array:
    """`[batch, embed]` float32: the mean of the final encoder output (after the final norm, what
    the decoder cross-attends to) over each row's non-pad positions of `[batch, length]` tokens
    (pad id 0); 0 for a row of padding only. Jit it with `model` static (`make_features_fn`)."""
    encoder_outputs = model.apply({"params": params}, encoder_input_tokens, method=T5.encode)
    pooled, _ = segment_mean_pool(
        encoder_outputs.encoded, encoder_outputs.mask, None, max_segments=1
    )
    return pooled[:, 0]


def make_features_fn(model: T5) -> Callable[[object, Array], Array]:
    """A jitted `(params, encoder_input_tokens [batch, length]) -> [batch, embed]`; see
    `pooled_encoder_outputs`."""
    return jax.jit(functools.partial(pooled_encoder_outputs, model))


def fit_and_score(
    train_features: np.ndarray,
    train_labels: Sequence,
    test_features: np.ndarray,
    test_labels: Sequence,
    seed: int = 0,
) -> float:
    """Test accuracy of a logistic regression fitted on `[examples, features]` train features
    (standardised by the train split's mean and variance); a test label absent from the train
    labels cannot be predicted, so it counts as an error."""
    classifier = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=MAX_ITER, random_state=seed)
    )
    classifier.fit(np.asarray(train_features), np.asarray(train_labels))
    iterations = int(np.max(classifier[-1].n_iter_))
    if iterations >= MAX_ITER:
        console.warning(
            f"warning: the probe's logistic regression stopped at max_iter={MAX_ITER} before "
            "converging; its accuracy may be a little low"
        )
    predictions = classifier.predict(np.asarray(test_features))
    return float(np.mean(predictions == np.asarray(test_labels)))


def _split_examples(
    task_name: str, split: str, lengths: Mapping[str, int], max_examples: int, setting: str
) -> tuple[list[np.ndarray], list[str]]:
    """The input tokens and target texts of a split's first `max_examples` (0: all); a split
    the task lacks is a ConfigError naming `setting`, the Gin parameter that chose it."""
    check_split(task_name, split, f"probe.{setting}")
    task, examples = task_examples(task_name, split, lengths, max_examples or -1)
    vocabulary = task.output_features["targets"].vocabulary
    return [e["inputs"] for e in examples], [target_text(e, vocabulary) for e in examples]


def _check_labels(task_name: str, split: str, labels: Sequence[str]) -> None:
    classes = len(set(labels))
    if not 2 <= classes <= min(MAX_CLASSES, len(labels) // 2):
        raise ConfigError(
            f"probe: the targets of {task_name}:{split} are not class labels ({classes} distinct "
            f"target texts in {len(labels)} examples; a probe needs 2 to {MAX_CLASSES}, each "
            "seen twice on average): set MIXTURE_OR_TASK_NAME to a classification task, e.g. "
            '--gin.MIXTURE_OR_TASK_NAME=\\"downstream_wiki_topic\\".'
        )


def _features(
    features_fn, params, rows: list[np.ndarray], length: int, batch_size: int, sharding, name: str
) -> np.ndarray:
    """`[len(rows), embed]` features, in batches of `batch_size` rows placed by `sharding` (the
    last one filled with rows of padding, so one program serves every batch), with a progress
    line."""
    batches = []
    num_batches = -(-len(rows) // batch_size)
    for index in range(num_batches):
        batch = rows[index * batch_size : (index + 1) * batch_size]
        tokens = pad_rows(batch + [np.zeros(0, np.int32)] * (batch_size - len(batch)), length)
        features = features_fn(params, jax.device_put(tokens, sharding))
        batches.append(np.asarray(jax.device_get(features))[: len(batch)])
        if (index + 1) % PROGRESS_EVERY == 0 or index + 1 == num_batches:
            done = min((index + 1) * batch_size, len(rows))
            console.info(f"probe features of {name}: {done}/{len(rows)} examples")
    return np.concatenate(batches)


@gin.configurable(module="e2s2_jax")
def probe(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    model=gin.REQUIRED,
    batch_size: int = 32,
    train_split: str = "train",
    test_split: str = "test",
    max_train_examples: int = 0,
    max_test_examples: int = 0,
    checkpoint_step: int | None = None,
    seed: int = 0,
    mesh_shape: Sequence[int] = (-1, 1, 1),
) -> dict[str, float | int]:
    """A linear probe of MODEL_DIR's frozen encoder on a classification task: each example's
    label is its target text, its features the mean-pooled final encoder output of its inputs.

    Returns `{"probe_accuracy", "majority_accuracy" (the most frequent train label's share of the
    test split), "train_examples", "test_examples", "classes" (distinct train labels), "task",
    "train_split", "test_split", "checkpoint_step" (the step probed; null for an imported params
    directory)}`, also written to MODEL_DIR/probe_metrics.json. `max_*_examples` of 0 read the
    whole split.
    """
    if jax.process_count() > 1:
        raise ConfigError("probe runs on one process; launch it without --num_processes.")
    # The labels first: a task that is not a classification fails before the restore.
    task_name = mixture_or_task_name
    train_rows, train_labels = _split_examples(
        task_name, train_split, task_feature_lengths, max_train_examples, "train_split"
    )
    _check_labels(task_name, train_split, train_labels)
    test_rows, test_labels = _split_examples(
        task_name, test_split, task_feature_lengths, max_test_examples, "test_split"
    )
    if not test_rows:
        raise ConfigError(
            f"probe: {task_name}:{test_split} has no examples; set probe.test_split to a split "
            "that has some."
        )
    rules = partitioning.LOGICAL_AXIS_RULES
    mesh = partitioning.job_mesh("probe", mesh_shape, batch_size)
    params = restore_params(model_dir, model, mesh, rules, checkpoint_step)
    extract = functools.partial(
        _features,
        make_features_fn(model),
        params,
        length=task_feature_lengths["inputs"],
        batch_size=batch_size,
        sharding=partitioning.batch_sharding(mesh, rules),
    )
    train_features = extract(train_rows, name=train_split)
    test_features = extract(test_rows, name=test_split)

    majority_label = collections.Counter(train_labels).most_common(1)[0][0]
    results = {
        "probe_accuracy": fit_and_score(
            train_features, train_labels, test_features, test_labels, seed
        ),
        "majority_accuracy": float(np.mean(np.asarray(test_labels) == majority_label)),
        "train_examples": len(train_labels),
        "test_examples": len(test_labels),
        "classes": len(set(train_labels)),
        "task": task_name,
        "train_split": train_split,
        "test_split": test_split,
        "checkpoint_step": (
            checkpoint_step
            if checkpoint_step is not None
            else params_io.newest_checkpoint_step(model_dir)
        ),
    }
    console.info(
        f"probe of {model_dir} on {task_name} ({results['classes']} classes, "
        f"{results['train_examples']} {train_split} / {results['test_examples']} {test_split} "
        f"examples): accuracy {results['probe_accuracy']:.4f}, majority class "
        f"{results['majority_accuracy']:.4f}"
    )
    path = os.path.join(model_dir, "probe_metrics.json")
    try:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
    except OSError as error:  # a finished run made read-only: the line above has the numbers
        console.warning(f"warning: {path} not written ({error.strerror}); the metrics are above")
    return results
