"""E2S2's second view as a SeqIO preprocessor: span corruption (view M), then trigram shuffle
and random replacement (view N) with a noise label per position (METHODS.md section 1)."""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from e2s2_jax.data.span_corruption import (
    SPAN_TARGETS,
    check_sentinels_available,
    check_target_mode,
    corrupt_spans,
    seed_pair,
    vocabulary_of,
)
from e2s2_jax.data.view_labels import E2S2_REPLACED, E2S2_SHUFFLED, E2S2_UNTOUCHED, NO_SECOND_VIEW

# The six orderings of a trigram; the shuffle picks one uniformly (identity included, as the
# reference's randperm(3) does), so on average two of the three tokens move.
_TRIGRAM_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

NOISE_LABEL_UNTOUCHED = E2S2_UNTOUCHED
NOISE_LABEL_SHUFFLED = E2S2_SHUFFLED
NOISE_LABEL_REPLACED = E2S2_REPLACED

# `noise_labels` is declared as a task feature with this vocabulary: its "eos" is 0, so the
# usual append-eos step gives the appended eos of `inputs_noised` the label "untouched".
# Its size covers view_labels.NO_SECOND_VIEW, the label of an example without a second view.
NOISE_LABELS_VOCABULARY = seqio.PassThroughVocabulary(
    size=NO_SECOND_VIEW + 1, eos_id=NOISE_LABEL_UNTOUCHED
)


def special_token_mask(tokens: tf.Tensor, vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """Returns bool [length]: pad, eos, unk or any extra id (sentinel)."""
    is_special = tf.equal(tokens, vocabulary.pad_id)
    for token_id in (vocabulary.eos_id, getattr(vocabulary, "unk_id", None)):
        if token_id is not None:
            is_special |= tf.equal(tokens, token_id)
    first_extra_id = vocabulary.vocab_size - (vocabulary.extra_ids or 0)
    return is_special | (tokens >= first_extra_id)


def trigram_shuffle(
    tokens: tf.Tensor,
    is_special: tf.Tensor,
    seed: tf.Tensor,
    window: int = 18,
    anchor_ratio: float = 0.05,
    max_anchors: int = 26,
) -> tf.Tensor:
    """Returns the tokens with local trigrams shuffled (E2S2's word-structure noise).

    The non-special positions are walked in windows of `window`; each window draws one anchor
    i uniformly. If i-1, i, i+1 exist and are all non-special, the trigram is put in a uniformly
    random order. Shuffling stops after min(max_anchors, max(1, round(anchor_ratio * length)))
    trigrams. A trigram that would overlap the previous window's anchor trigram is skipped (the
    reference re-shuffled such overlaps; keeping them apart makes the labels local).
    """
    num_tokens = tf.size(tokens)
    nonspecial_positions = tf.cast(tf.where(tf.logical_not(is_special))[:, 0], tf.int32)
    num_nonspecial = tf.size(nonspecial_positions)
    num_windows = (num_nonspecial + window - 1) // window
    window_starts = tf.range(num_windows) * window
    window_sizes = tf.minimum(window, num_nonspecial - window_starts)
    anchor_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offsets = tf.random.stateless_uniform(
        [num_windows], seed=anchor_seed, minval=0, maxval=2**30, dtype=tf.int32
    ) % tf.maximum(window_sizes, 1)
    anchors = tf.gather(nonspecial_positions, window_starts + offsets)

    padded_special = tf.concat([[True], is_special, [True]], axis=0)  # sentinels at both ends
    valid = tf.logical_not(tf.gather(padded_special, anchors)) & tf.logical_not(
        tf.gather(padded_special, anchors + 2)
    )
    previous_anchors = tf.concat([[-(10**6)], anchors[:-1]], axis=0)
    valid &= anchors - previous_anchors > 2
    length = tf.cast(num_tokens, tf.float64)
    anchor_budget = tf.minimum(
        max_anchors, tf.maximum(1, tf.cast(tf.round(length * anchor_ratio), tf.int32))
    )
    applied = valid & (tf.cumsum(tf.cast(valid, tf.int32)) <= anchor_budget)

    orders = tf.random.stateless_uniform(
        [num_windows], seed=order_seed, minval=0, maxval=6, dtype=tf.int32
    )
    applied_anchors = tf.boolean_mask(anchors, applied)
    applied_orders = tf.gather(tf.constant(_TRIGRAM_PERMUTATIONS, tf.int32), orders)
    applied_orders = tf.boolean_mask(applied_orders, applied)
    destinations = applied_anchors[:, None] + tf.constant([[-1, 0, 1]], tf.int32)
    sources = applied_anchors[:, None] - 1 + applied_orders
    source_of_position = tf.tensor_scatter_nd_update(
        tf.range(num_tokens), tf.reshape(destinations, [-1, 1]), tf.reshape(sources, [-1])
    )
    return tf.gather(tokens, source_of_position)


def random_replacement(
    tokens: tf.Tensor,
    is_special: tf.Tensor,
    is_protected: tf.Tensor,
    seed: tf.Tensor,
    vocabulary: seqio.Vocabulary,
    replace_ratio: float = 0.15,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (tokens, replaced bool [length]) after E2S2's random replacement.

    ceil(replace_ratio * length) distinct positions are drawn; each that is neither special
    nor protected (already moved by the shuffle) gets a token drawn uniformly from the
    non-special ids other than its own, so a replaced position always changes.
    """
    num_tokens = tf.size(tokens)
    position_seed, token_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    num_drawn = tf.cast(tf.math.ceil(tf.cast(num_tokens, tf.float64) * replace_ratio), tf.int32)
    num_drawn = tf.minimum(num_drawn, num_tokens)
    _, drawn_positions = tf.math.top_k(
        tf.random.stateless_uniform([num_tokens], seed=position_seed), k=num_drawn, sorted=False
    )
    is_drawn = tf.scatter_nd(
        tf.expand_dims(drawn_positions, 1), tf.ones_like(drawn_positions), [num_tokens]
    )
    replaced = tf.cast(is_drawn, tf.bool) & tf.logical_not(is_special | is_protected)

    # Regular ids are [0, first_extra_id) minus pad/eos/unk; draw a rank among them, skipping
    # the current token's own rank, then map the rank back to an id.
    first_extra_id = vocabulary.vocab_size - (vocabulary.extra_ids or 0)
    low_specials = sorted(
        {
            token_id
            for token_id in (
                vocabulary.pad_id,
                vocabulary.eos_id,
                getattr(vocabulary, "unk_id", None),
            )
            if token_id is not None and 0 <= token_id < first_extra_id
        }
    )
    num_regular_ids = first_extra_id - len(low_specials)
    if num_regular_ids < 2:
        raise ValueError(
            f"The vocabulary has {num_regular_ids} regular (non-special) ids; random "
            "replacement needs at least 2: use a larger vocabulary."
        )
    own_rank = tokens
    for special_id in low_specials:
        own_rank -= tf.cast(tokens > special_id, tf.int32)
    rank = tf.random.stateless_uniform(
        [num_tokens], seed=token_seed, minval=0, maxval=num_regular_ids - 1, dtype=tf.int32
    )
    rank += tf.cast(rank >= own_rank, tf.int32)
    new_ids = rank
    for special_id in low_specials:
        new_ids += tf.cast(new_ids >= special_id, tf.int32)
    return tf.where(replaced, new_ids, tokens), replaced


def make_noised_view(
    tokens: tf.Tensor,
    seed: tf.Tensor,
    vocabulary: seqio.Vocabulary,
    shuffle_window: int = 18,
    shuffle_anchor_ratio: float = 0.05,
    max_shuffle_anchors: int = 26,
    replace_ratio: float = 0.15,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (view N tokens, int32 noise labels) for view M `tokens` [length].

    Labels: 0 untouched, 1 moved by the shuffle (token differs), 2 replaced. Special tokens
    (pad, eos, unk, sentinels) are never moved nor replaced.
    """
    tokens = tf.cast(tokens, tf.int32)
    is_special = special_token_mask(tokens, vocabulary)
    shuffle_seed, replace_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shuffled = trigram_shuffle(
        tokens,
        is_special,
        shuffle_seed,
        shuffle_window,
        shuffle_anchor_ratio,
        max_shuffle_anchors,
    )
    moved = tf.not_equal(shuffled, tokens)
    noised, replaced = random_replacement(
        shuffled, is_special, moved, replace_seed, vocabulary, replace_ratio
    )
    noise_labels = tf.where(
        replaced,
        NOISE_LABEL_REPLACED,
        tf.where(moved, NOISE_LABEL_SHUFFLED, NOISE_LABEL_UNTOUCHED),
    )
    return noised, tf.cast(noise_labels, tf.int32)


def e2s2_views(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    target_mode: str = SPAN_TARGETS,
    shuffle_window: int = 18,
    shuffle_anchor_ratio: float = 0.05,
    max_shuffle_anchors: int = 26,
    replace_ratio: float = 0.15,
    feature_key: str = "targets",
) -> tf.data.Dataset:
    """E2S2's two views as a SeqIO preprocessor (METHODS.md section 1).

    Emits int32 `inputs` (view M: span-corrupted), `inputs_noised` (view N: view M after
    trigram shuffle and random replacement, same length), `noise_labels` (0/1/2 per position of
    view N) and `targets` (span targets, or the text for full reconstruction); no eos yet.
    """
    check_target_mode(target_mode)
    vocabulary = vocabulary_of(output_features, "targets")
    check_sentinels_available(vocabulary, 1)

    @seqio.map_over_dataset(num_seeds=1)
    def make_views(features, seed):
        corruption_seed, view_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed_pair(seed), 2)
        )
        inputs, targets = corrupt_spans(
            features[feature_key],
            corruption_seed,
            vocabulary.vocab_size,
            vocabulary.extra_ids,
            noise_density,
            mean_noise_span_length,
            target_mode,
        )
        inputs_noised, noise_labels = make_noised_view(
            inputs,
            view_seed,
            vocabulary,
            shuffle_window,
            shuffle_anchor_ratio,
            max_shuffle_anchors,
            replace_ratio,
        )
        return {
            "inputs": inputs,
            "inputs_noised": inputs_noised,
            "noise_labels": noise_labels,
            "targets": targets,
        }

    return make_views(dataset)
