"""SeqIO tasks over the SSR job's records, for Gin: the SSR task alone, mixed with span
corruption at a rate, or a curriculum stage that keeps the easiest fills (highest generator
log-probability) first."""

from __future__ import annotations

import functools
import os

import gin
import numpy as np
import seqio
import tensorflow as tf

import tasks  # noqa: F401  (registers the bundled span-corruption tasks a mixture may name)
from e2s2_jax.data import encoder_views, preprocessors
from e2s2_jax.data.vocab import get_vocabulary
from e2s2_jax.errors import ConfigError
from tasks.registration import add_task, register_mixture

RECORD_PATTERN = "ssr-*.tfrecord"


def fill_scores(records_dir: str) -> np.ndarray:
    """The `fill_score` of every record under `records_dir`."""
    files = sorted(tf.io.gfile.glob(os.path.join(records_dir, RECORD_PATTERN)))
    dataset = tf.data.TFRecordDataset(files).map(
        lambda record: tf.io.parse_single_example(
            record, {"fill_score": preprocessors.SSR_FEATURE_DESCRIPTION["fill_score"]}
        )["fill_score"]
    )
    return np.fromiter(dataset.as_numpy_iterator(), np.float32)


def curriculum_threshold(scores: np.ndarray, stage: int, num_stages: int) -> float:
    """The lowest fill_score stage `stage` (0-based) of `num_stages` keeps: stage s keeps the
    easiest (s + 1) / num_stages of the records, so the last stage keeps them all."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"curriculum stage {stage} is not in [0, {num_stages})")
    if stage == num_stages - 1 or len(scores) == 0:
        return -np.inf
    return float(np.quantile(scores, 1.0 - (stage + 1) / num_stages))


def _keep_fill_score_at_least(dataset: tf.data.Dataset, threshold: float) -> tf.data.Dataset:
    return dataset.filter(lambda example: example["fill_score"] >= threshold)


@gin.configurable(module="e2s2_jax")
def ssr_mixture_or_task(
    records_dir: str = gin.REQUIRED,
    *,
    name: str = "ssr",
    vocabulary_model: str | None = None,
    span_corruption_task: str = "bundled_span_corruption",
    span_corruption_rate: float = 0.0,
    curriculum_stage: int | None = None,
    curriculum_stages: int = 3,
    shuffle_buffer_size: int | None = 1000,
    encoder_view: str | None = None,
    swap_rate: float = 0.15,
    cluster_file: str | None = None,
) -> str:
    """Registers the SSR task over `records_dir`'s records (its 'train' split) and returns the
    name to train on: the task, or with `span_corruption_rate` > 0 a mixture where that fraction
    of examples comes from `span_corruption_task` (which must use the same vocabulary).

    `curriculum_stage` s of `curriculum_stages`: keep only the easiest (s + 1) / stages of the
    records by fill_score (train stage 0, then 1, ... by raising TRAIN_STEPS between runs).

    `encoder_view`: a second view of the records' inputs ('e2s2', 'rts', 'c_rts', 'slm' with
    `swap_rate` / `cluster_file`; `encoder_views.add_encoder_view`), for E2S2Objective; the
    mixture's `span_corruption_task` must then carry a second view too (bundled_e2s2,
    bundled_rts, ..., or bundled_span_corruption_no_view, whose rows add no encoder term).
    """
    files = tf.io.gfile.glob(os.path.join(records_dir, RECORD_PATTERN))
    if not files:
        raise FileNotFoundError(
            f"no SSR records ({RECORD_PATTERN}) in {records_dir}: run `python -m e2s2_jax.main "
            "ssr-generate` (gin/runs/ssr_generate.gin) first."
        )
    if not 0.0 <= span_corruption_rate < 1.0:
        raise ValueError(f"span_corruption_rate={span_corruption_rate}: use a value in [0, 1).")
    vocabulary = get_vocabulary(vocabulary_model)
    steps = list(preprocessors.ssr_preprocessors())
    task_name = name
    if encoder_view is not None:
        view_options = {"swap_rate": swap_rate, "cluster_file": cluster_file}
        encoder_views.check_view_settings(encoder_view, vocabulary, **view_options)
        steps.append(
            functools.partial(encoder_views.add_encoder_view, view=encoder_view, **view_options)
        )
        task_name = f"{name}_{encoder_view}"
    if curriculum_stage is not None:
        threshold = curriculum_threshold(
            fill_scores(records_dir), curriculum_stage, curriculum_stages
        )
        steps.insert(0, functools.partial(_keep_fill_score_at_least, threshold=threshold))
        task_name = f"{name}_stage{curriculum_stage}_of_{curriculum_stages}"
    add_task(
        task_name,
        source=preprocessors.ssr_task_source({"train": os.path.join(records_dir, RECORD_PATTERN)}),
        output_features=preprocessors.pretraining_output_features(
            vocabulary, with_noised_view=encoder_view is not None
        ),
        preprocessors=steps,
        shuffle_buffer_size=shuffle_buffer_size,
    )
    if span_corruption_rate == 0.0:
        return task_name
    other = seqio.get_mixture_or_task(span_corruption_task)  # fails early naming an unknown task
    if ("inputs_noised" in other.output_features) != (encoder_view is not None):
        raise ConfigError(
            f"ssr_mixture_or_task.span_corruption_task={span_corruption_task!r} "
            + (
                "has no second view but encoder_view is set: use a task with one "
                "(bundled_e2s2, bundled_rts, bundled_span_corruption_no_view, ...)."
                if encoder_view is not None
                else "has a second view but encoder_view is None: use bundled_span_corruption."
            )
        )
    mixture = f"{task_name}_and_{span_corruption_task}"
    register_mixture(
        mixture,
        [task_name, span_corruption_task],
        rates={task_name: 1.0 - span_corruption_rate, span_corruption_task: span_corruption_rate},
    )
    return mixture
