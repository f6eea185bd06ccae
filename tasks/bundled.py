"""Tasks and mixtures over the bundled corpus (data/corpus) with the demo vocabulary."""

from __future__ import annotations

import logging

from e2s2_jax.data import preprocessors
from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES, BUNDLED_VALIDATION_FILES
from tasks.registration import register_mixture, register_text_task

log = logging.getLogger(__name__)

# Task name for each objective: bundled_span_corruption, bundled_full_reconstruction,
# bundled_e2s2, bundled_e2s2_full_reconstruction, bundled_rts, bundled_slm,
# bundled_span_corruption_no_view (C-RTS needs a cluster file: tasks/encoder_views.py).
BUNDLED_TASKS = {
    objective: f"bundled_{objective}"
    for objective in preprocessors.OBJECTIVES
    if objective not in preprocessors.OBJECTIVES_WITH_REQUIRED_OPTIONS
}
# Mixtures need tasks with identical features: the plain objectives mix with each other (and
# with SSR tasks), the objectives with a second view (E2S2, RTS, SLM, and span corruption with
# an empty view slot, whose rows add no encoder term) with each other.
BUNDLED_MIXTURES = {
    "bundled_span_corruption_and_full_reconstruction": (
        BUNDLED_TASKS["span_corruption"],
        BUNDLED_TASKS["full_reconstruction"],
    ),
    "bundled_e2s2_and_e2s2_full_reconstruction": (
        BUNDLED_TASKS["e2s2"],
        BUNDLED_TASKS["e2s2_full_reconstruction"],
    ),
    "bundled_span_corruption_and_e2s2": (
        BUNDLED_TASKS["span_corruption_no_view"],
        BUNDLED_TASKS["e2s2"],
    ),
}


def register_bundled_tasks(vocabulary=None) -> None:
    """Registers BUNDLED_TASKS and BUNDLED_MIXTURES (demo vocabulary unless one is given)."""
    if vocabulary is None:
        from e2s2_jax.data.vocab import get_vocabulary

        vocabulary = get_vocabulary()
    splits = {"train": BUNDLED_TRAIN_FILES, "validation": BUNDLED_VALIDATION_FILES}
    for objective, name in BUNDLED_TASKS.items():
        register_text_task(name, splits, objective, vocabulary)
    for name, task_names in BUNDLED_MIXTURES.items():
        register_mixture(name, task_names, rates="equal")


def try_register_bundled_tasks() -> bool:
    """Registers the bundled tasks; returns False (with a warning) when the corpus is missing."""
    try:
        register_bundled_tasks()
    except FileNotFoundError as error:
        log.warning("bundled tasks not registered: %s", error)
        return False
    return True
