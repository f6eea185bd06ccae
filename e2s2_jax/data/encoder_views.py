"""Encoder-side second views as an operation on any seq2seq task's `inputs`: E2S2's noised
view, RTS / C-RTS / SLM's swapped view, or an empty slot for examples without one (so that such
tasks mix with the others). Also the pretraining preprocessors that put a view over span
corruption (`rts`, `c_rts`, `slm`), as `e2s2_views` does for E2S2.

A view adds `inputs_noised` (the view's tokens, the length of `inputs`) and `noise_labels`
(`view_labels`: E2S2's 0/1/2, the swaps' 0/1, or NO_SECOND_VIEW); run it before the eos is
appended. SLM's encoder targets are the original `inputs` at the positions labelled replaced
(`objectives.slm_targets`), so it needs no feature of its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from e2s2_jax.data import token_swaps, view_labels
from e2s2_jax.data.e2s2_views import make_noised_view
from e2s2_jax.data.span_corruption import seed_pair, vocabulary_of
from e2s2_jax.errors import ConfigError

# view name -> what it writes. "slm" is the swapped view of "rts" (its head reads other labels).
VIEWS = ("e2s2", "rts", "c_rts", "slm", "none")
SWAP_VIEWS = ("rts", "c_rts", "slm")


def substitution_table(
    view: str, vocabulary: seqio.Vocabulary, cluster_file: str | None
) -> token_swaps.SubstitutionTable:
    """The table a swap view draws from: C-RTS's clusters from `cluster_file`, else uniform."""
    if view == "c_rts":
        if not cluster_file:
            raise ConfigError(
                "the c_rts view needs cluster_file: a token -> cluster .npy built with "
                "`python -m e2s2_jax.main clusters --params_dir CHECKPOINT --output FILE`."
            )
        return token_swaps.load_cluster_file(cluster_file, vocabulary)
    return token_swaps.uniform_table(vocabulary)


def check_view_settings(
    view: str,
    vocabulary: seqio.Vocabulary,
    swap_rate: float = 0.15,
    cluster_file: str | None = None,
) -> None:
    """Raises ConfigError naming a bad setting of `view` and its fix. Task registration calls
    it, so bad settings stop before any model is built; only C-RTS reads its file (and the
    vocabulary's size) now, so registering a C4 task still loads nothing."""
    if view not in VIEWS:
        raise ConfigError(f"view={view!r} is not one of {VIEWS}.")
    if view in SWAP_VIEWS:
        token_swaps.check_swap_rate(swap_rate)
    if view == "c_rts":
        substitution_table(view, vocabulary, cluster_file)


def add_encoder_view(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    *,
    view: str,
    swap_rate: float = 0.15,
    cluster_file: str | None = None,
    **e2s2_options,
) -> tf.data.Dataset:
    """Adds a second view of each example's int `inputs` as a SeqIO preprocessor.

    view: 'e2s2' (trigram shuffle and random replacement, `e2s2_views.make_noised_view`, with
    `e2s2_options` such as replace_ratio), 'rts' / 'slm' (uniform substitutes at `swap_rate`),
    'c_rts' (substitutes from the token's cluster in `cluster_file`) or 'none' (a copy of the
    inputs labelled NO_SECOND_VIEW). Other features pass through. Bad settings raise
    ConfigError when the task is built, before any data is read.
    """
    vocabulary = vocabulary_of(output_features, "inputs")
    check_view_settings(view, vocabulary, swap_rate, cluster_file)
    table = substitution_table(view, vocabulary, cluster_file) if view in SWAP_VIEWS else None

    @seqio.map_over_dataset(num_seeds=1)
    def with_view(features, seed):
        inputs = tf.cast(features["inputs"], tf.int32)
        if view == "none":
            noised = inputs
            labels = tf.fill(tf.shape(inputs), view_labels.NO_SECOND_VIEW)
        elif view == "e2s2":
            noised, labels = make_noised_view(inputs, seed_pair(seed), vocabulary, **e2s2_options)
        else:
            noised, replaced = token_swaps.swap_tokens(inputs, seed_pair(seed), table, swap_rate)
            labels = tf.where(replaced, view_labels.SWAP_REPLACED, view_labels.SWAP_ORIGINAL)
        return {**features, "inputs": inputs, "inputs_noised": noised, "noise_labels": labels}

    return with_view(dataset)
