"""The method study's tasks: importing this module registers them with the study vocabulary.

`study_span_corruption` and `study_e2s2` pretrain on the bundled corpus, and the downstream tasks
are registered again (same names) with the study's vocabulary: a demo-sized SentencePiece
trained on the corpus plus every downstream train split. `e2s2_jax.study` runs the trainer in
its own process with these registrations; its printed `python -m e2s2_jax.main` commands name
`gin/tasks/study.gin` (one line, `import tasks.study`) so that they replay from a shell too.
The vocabulary is cached by content (`e2s2_jax.data.vocab.train_sentencepiece`), so every
process that imports this module gets the same model file.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from e2s2_jax.data.corpus import (
    BUNDLED_TRAIN_FILES,
    BUNDLED_VALIDATION_FILES,
    DEMO_VOCAB_SIZE,
)
from e2s2_jax.data.vocab import default_cache_dir, get_vocabulary, train_sentencepiece
from tasks.downstream import (
    DOWNSTREAM_SPECS,
    dataset_files,
    read_tsv_examples,
    register_downstream_tasks,
)
from tasks.registration import register_text_task

STUDY_GIN_FILE = "gin/tasks/study.gin"
# {objective kind: pretraining task name}
STUDY_PRETRAIN_TASKS = {kind: f"study_{kind}" for kind in ("span_corruption", "e2s2")}


def study_vocabulary_path(cache_dir: str | None = None) -> str:
    """Trains (or finds cached) the study's SentencePiece model; returns its .model path.

    The downstream train splits (both sides) are written as one gzip text file beside the
    cached models (written only when its content changed, through a temporary file), so the
    cache key, which hashes contents, is the same in every process and checkout.
    """
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    lines = []
    for dataset in DOWNSTREAM_SPECS:
        for inputs, targets in read_tsv_examples(dataset_files(dataset)["train"]):
            lines += [inputs, targets]
    content = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    text_path = Path(cache_dir) / "study_downstream_train.txt.gz"
    if not text_path.is_file() or text_path.read_bytes() != content:
        temporary = text_path.with_name(f"{text_path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(content)
        os.replace(temporary, text_path)
    return train_sentencepiece(
        [*BUNDLED_TRAIN_FILES, str(text_path)], DEMO_VOCAB_SIZE, cache_dir=cache_dir
    )


def register_study_tasks(vocabulary) -> dict[str, str]:
    """Registers the study's pretraining and downstream tasks with `vocabulary`; returns
    {objective kind: pretraining task name}."""
    splits = {"train": BUNDLED_TRAIN_FILES, "validation": BUNDLED_VALIDATION_FILES}
    for kind, name in STUDY_PRETRAIN_TASKS.items():
        register_text_task(name, splits, kind, vocabulary)
    register_downstream_tasks(vocabulary)
    return dict(STUDY_PRETRAIN_TASKS)


STUDY_VOCABULARY_PATH = study_vocabulary_path()
STUDY_VOCABULARY = get_vocabulary(STUDY_VOCABULARY_PATH)
register_study_tasks(STUDY_VOCABULARY)
