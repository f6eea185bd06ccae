"""Tasks with an encoder-side view for Gin (gin/objectives/{rts,c_rts,slm}.gin): registers
span corruption with the RTS, C-RTS or SLM view over the bundled corpus (or C4) with the given
settings and returns the task name, so that the settings are Gin bindings and bad ones stop the
run before anything is built."""

from __future__ import annotations

import gin

from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES, BUNDLED_VALIDATION_FILES
from e2s2_jax.data.token_swaps import check_swap_rate
from e2s2_jax.data.vocab import get_vocabulary
from e2s2_jax.errors import ConfigError
from tasks.c4 import C4_TFDS_NAME, t5_vocabulary
from tasks.registration import register_text_task, register_tfds_task

CORPORA = ("bundled", "c4")


@gin.configurable(module="e2s2_jax")
def encoder_view_task(
    view: str = gin.REQUIRED,
    *,
    corpus: str = "bundled",
    swap_rate: float = 0.15,
    cluster_file: str | None = None,
    vocabulary_model: str | None = None,
) -> str:
    """Registers `<corpus>_<view>` (span corruption, then the `view` of its inputs: 'rts',
    'c_rts' or 'slm') and returns its name. corpus: 'bundled' (the demo vocabulary unless
    `vocabulary_model`) or 'c4' (T5's vocabulary). C-RTS needs `cluster_file`
    (`python -m e2s2_jax.main clusters`)."""
    if corpus not in CORPORA:
        raise ConfigError(f"encoder_view_task.corpus={corpus!r} is not one of {CORPORA}.")
    check_swap_rate(swap_rate, "encoder_view_task.swap_rate (Gin macro SWAP_RATE)")
    options = {"swap_rate": swap_rate}
    if cluster_file is not None:
        options["cluster_file"] = cluster_file
    name = f"{corpus}_{view}"
    if view not in ("rts", "c_rts", "slm"):
        raise ConfigError(
            f"encoder_view_task.view={view!r}: use 'rts', 'c_rts' or 'slm' (E2S2's tasks are "
            "bundled_e2s2 and c4_e2s2)."
        )
    if corpus == "c4":
        vocabulary = get_vocabulary(vocabulary_model) if vocabulary_model else t5_vocabulary()
        register_tfds_task(name, C4_TFDS_NAME, view, vocabulary, **options)
    else:
        splits = {"train": BUNDLED_TRAIN_FILES, "validation": BUNDLED_VALIDATION_FILES}
        register_text_task(name, splits, view, get_vocabulary(vocabulary_model), **options)
    return name
