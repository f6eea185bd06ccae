"""A small text-to-text task from the bundled corpus, for showing fine-tuning end to end.

`bundled_restore_case`: the input is a paragraph's first sentence lower-cased with its
punctuation removed, after the prefix "restore case: "; the target is the sentence as written.
Metrics: exact match and word accuracy of greedy decodes.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from e2s2_jax import metrics
from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES, BUNDLED_VALIDATION_FILES
from e2s2_jax.data.text_source import text_files_data_source
from tasks.downstream import text_to_text_preprocessors
from tasks.registration import add_task

RESTORE_CASE_TASK = "bundled_restore_case"
PREFIX = "restore case: "


@seqio.map_over_dataset
def restore_case_example(example: dict, text_key: str = "text") -> dict:
    """`{text}` -> `{inputs, targets}` (strings): the first sentence, damaged and intact."""
    text = tf.strings.strip(example[text_key])
    sentence = tf.strings.regex_replace(text, r"^(.*?[.!?])\s.*$", r"\1")
    damaged = tf.strings.lower(tf.strings.regex_replace(sentence, r"[^\w\s]", ""))
    return {"inputs": tf.strings.join([PREFIX, damaged]), "targets": sentence}


def register_finetune_tasks(vocabulary=None) -> seqio.Task:
    if vocabulary is None:
        from e2s2_jax.data.vocab import get_vocabulary

        vocabulary = get_vocabulary()
    source = text_files_data_source(
        {"train": BUNDLED_TRAIN_FILES, "validation": BUNDLED_VALIDATION_FILES}
    )
    features = {name: seqio.Feature(vocabulary, add_eos=True) for name in ("inputs", "targets")}
    return add_task(
        RESTORE_CASE_TASK,
        source=source,
        output_features=features,
        preprocessors=text_to_text_preprocessors(restore_case_example),
        metric_fns=[metrics.exact_match, metrics.word_accuracy],
    )
