"""The same-document task for Gin (gin/objectives/same_document.gin): registers span pairs from
the bundled corpus's chapters or from a user's files, alone or mixed with span corruption, and
returns the task or mixture name, so that its settings are Gin bindings and bad ones (too few
documents) stop the run before anything is built."""

from __future__ import annotations

import gin

from e2s2_jax.data import preprocessors
from e2s2_jax.data.corpus import (
    BUNDLED_TRAIN_CHAPTERS,
    BUNDLED_TRAIN_FILES,
    BUNDLED_VALIDATION_CHAPTERS,
    BUNDLED_VALIDATION_FILES,
)
from e2s2_jax.data.same_document import read_chapters, read_document_files
from e2s2_jax.data.vocab import get_vocabulary
from e2s2_jax.errors import ConfigError
from tasks.registration import register_mixture, register_same_document_task, register_text_task

NO_PAIR_OBJECTIVE = "span_corruption_no_pair"


@gin.configurable(module="e2s2_jax")
def same_document_task(
    *,
    files: str | None = None,
    document_unit: str = "file",
    mix_with_span_corruption: bool = False,
    span_words: int = 32,
    min_span_words: int = 8,
    seed: int = 0,
    vocabulary_model: str | None = None,
) -> str:
    """Registers the same-document task and returns its name: `bundled_same_document` (the
    bundled corpus's chapters as documents; train and validation splits) or, with `files` (a
    glob pattern of text files, one paragraph per line), `files_same_document` over their
    documents (`document_unit`: one per 'file' or per blank-line 'block'; a train split only).
    With `mix_with_span_corruption`, returns `<task>_and_span_corruption`, an equal mixture
    with span corruption of the same text whose rows add no same-document term."""
    vocabulary = get_vocabulary(vocabulary_model)
    if files is None:
        splits = {
            "train": read_chapters(BUNDLED_TRAIN_FILES[0], BUNDLED_TRAIN_CHAPTERS),
            "validation": read_chapters(BUNDLED_VALIDATION_FILES[0], BUNDLED_VALIDATION_CHAPTERS),
        }
        text_splits = {"train": BUNDLED_TRAIN_FILES, "validation": BUNDLED_VALIDATION_FILES}
        name = "bundled_same_document"
    else:
        try:
            splits = {"train": read_document_files(files, document_unit)}
        except (OSError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"same_document_task.files={files!r}: {error}") from error
        text_splits = {"train": files}
        name = "files_same_document"
    try:
        register_same_document_task(
            name,
            splits,
            vocabulary,
            span_words=span_words,
            min_span_words=min_span_words,
            seed=seed,
        )
    except ConfigError as error:
        raise ConfigError(f"same_document_task: {error}") from error
    if not mix_with_span_corruption:
        return name
    span_corruption = f"{name.removesuffix('_same_document')}_{NO_PAIR_OBJECTIVE}"
    assert NO_PAIR_OBJECTIVE in preprocessors.OBJECTIVES_WITH_PAIR_LABELS
    register_text_task(span_corruption, text_splits, NO_PAIR_OBJECTIVE, vocabulary)
    mixture = f"{name}_and_span_corruption"
    register_mixture(mixture, [name, span_corruption], rates="equal")
    return mixture
