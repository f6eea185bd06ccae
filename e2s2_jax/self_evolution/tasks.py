"""The SeqIO task over the score-tokens job's records, for Gin: informativeness-weighted span
corruption (`data/informed_masking.py`) of the scored tokens."""

from __future__ import annotations

import functools
import json
import os

import gin
import numpy as np
import seqio
import tensorflow as tf

from e2s2_jax.data import informed_masking
from e2s2_jax.data.preprocessors import pretraining_output_features
from e2s2_jax.data.vocab import get_vocabulary
from e2s2_jax.errors import ConfigError
from e2s2_jax.self_evolution.job import RECORD_PATTERN
from tasks.registration import add_task

RECORD_SIGNATURE = {
    "targets": tf.TensorSpec([None], tf.int32),
    informed_masking.INFORMATIVENESS: tf.TensorSpec([None], tf.float32),
}


def read_records(files: list[str]):
    """Yields {targets, informativeness} of every JSON line of `files`, in order."""
    for path in files:
        with tf.io.gfile.GFile(path) as f:
            for line in f:
                record = json.loads(line)
                yield {
                    "targets": np.asarray(record["tokens"], np.int32),
                    informed_masking.INFORMATIVENESS: np.asarray(
                        record["informativeness"], np.float32
                    ),
                }


def records_dataset(
    files: list[str], split: str, shuffle_files: bool, seed: int | None = None
) -> tf.data.Dataset:
    """The records of `files` (the 'train' split) as a dataset; `shuffle_files` shuffles the
    file order with `seed`."""
    del split
    files = list(files)
    if shuffle_files:
        np.random.default_rng(seed).shuffle(files)
    return tf.data.Dataset.from_generator(
        lambda: read_records(files), output_signature=RECORD_SIGNATURE
    )


@gin.configurable(module="e2s2_jax")
def self_evolution_task(
    records_dir: str = gin.REQUIRED,
    *,
    name: str = "self_evolution",
    vocabulary_model: str | None = None,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    num_candidates: int = 16,
    temperature: float = 0.05,
    shuffle_buffer_size: int | None = 1000,
) -> str:
    """Registers task `name` over `records_dir`'s scored records (its 'train' split):
    informativeness-weighted span corruption, then eos; returns its name. Its examples also
    carry `reference_inputs`, the text before corruption."""
    files = sorted(tf.io.gfile.glob(os.path.join(records_dir, RECORD_PATTERN)))
    if not files:
        raise ConfigError(
            f"self_evolution_task.records_dir={records_dir!r} holds no scored records "
            f"({RECORD_PATTERN}): run `python -m e2s2_jax.main score-tokens` "
            "(gin/runs/score_tokens.gin) first, or point SCORES_DIR at its output."
        )
    noise = dict(noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)
    vocabulary = get_vocabulary(vocabulary_model)
    add_task(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(records_dataset, files), splits=("train",)
        ),
        output_features={
            **pretraining_output_features(vocabulary),
            # The uncorrupted text, with its eos: rectified label smoothing's reference input.
            informed_masking.REFERENCE_INPUTS: seqio.Feature(vocabulary=vocabulary, add_eos=True),
        },
        preprocessors=[
            functools.partial(informed_masking.split_scored_pieces, **noise),
            functools.partial(
                informed_masking.informed_span_corruption,
                num_candidates=num_candidates,
                temperature=temperature,
                **noise,
            ),
            seqio.preprocessors.append_eos_after_trim,
        ],
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return name
