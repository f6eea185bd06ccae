"""C4 (TFDS 'c4/en:3.0.1') under each objective with T5's vocabulary, for users who have C4
prepared; registering reads and downloads nothing (TFDS and the vocabulary load lazily)."""

from __future__ import annotations

import os

import seqio

from e2s2_jax.data import preprocessors
from tasks.registration import register_tfds_task

C4_TFDS_NAME = "c4/en:3.0.1"
# T5's SentencePiece model (32000 pieces + 100 extra ids); $E2S2_C4_SPM_PATH points elsewhere,
# e.g. a local copy. Read on first use, not at registration.
T5_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
C4_SPM_PATH_ENV_VAR = "E2S2_C4_SPM_PATH"
# Where the prepared TFDS data lives: $TFDS_DATA_DIR, else TFDS's default (~/tensorflow_datasets).
C4_DATA_DIR_ENV_VAR = "TFDS_DATA_DIR"
C4_TASKS = {
    objective: f"c4_{objective}"
    for objective in preprocessors.OBJECTIVES
    if objective not in preprocessors.OBJECTIVES_WITH_REQUIRED_OPTIONS
}


def t5_vocabulary() -> seqio.SentencePieceVocabulary:
    """Returns T5's vocabulary (or $E2S2_C4_SPM_PATH's) with 100 extra ids, loaded lazily."""
    return seqio.SentencePieceVocabulary(
        os.environ.get(C4_SPM_PATH_ENV_VAR, T5_SPM_PATH), extra_ids=100
    )


def register_c4_tasks(
    vocabulary: seqio.Vocabulary | None = None, tfds_data_dir: str | None = None
) -> None:
    """Registers C4_TASKS (c4_span_corruption, c4_e2s2, ...); T5's vocabulary by default."""
    vocabulary = vocabulary or t5_vocabulary()
    data_dir = tfds_data_dir or os.environ.get(C4_DATA_DIR_ENV_VAR)
    for objective, name in C4_TASKS.items():
        register_tfds_task(name, C4_TFDS_NAME, objective, vocabulary, tfds_data_dir=data_dir)
