"""SeqIO preprocessors for the pretraining objectives: T5 span corruption, E2S2's two views,
BART-style full reconstruction, document splitting, and the reader of SSR records."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping

import seqio
import tensorflow as tf

SPAN_TARGETS = "spans"
FULL_RECONSTRUCTION = "full_reconstruction"
TARGET_MODES = (SPAN_TARGETS, FULL_RECONSTRUCTION)

# T5's recipe: 568 raw tokens give inputs of 512 and targets of 114 (both with eos) at the
# default noise density and span length; used when no sequence length is known.
DEFAULT_MAX_DOCUMENT_TOKENS = 568

# The six orderings of a trigram; the shuffle picks one uniformly (identity included, as the
# reference's randperm(3) does), so on average two of the three tokens move.
_TRIGRAM_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

NOISE_LABEL_UNTOUCHED = 0
NOISE_LABEL_SHUFFLED = 1
NOISE_LABEL_REPLACED = 2

# `noise_labels` is declared as a task feature with this vocabulary: its "eos" is 0, so the
# usual append-eos step gives the appended eos of `inputs_noised` the label "untouched".
NOISE_LABELS_VOCABULARY = seqio.PassThroughVocabulary(size=3, eos_id=NOISE_LABEL_UNTOUCHED)


# ---------------------------------------------------------------------------------------------
# Length arithmetic (Python; the TensorFlow code below follows the same rule).
# ---------------------------------------------------------------------------------------------
def noise_token_and_span_counts(
    num_tokens: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """Returns (noise tokens, noise spans) that span corruption uses for `num_tokens` tokens.

    noise = round(num_tokens * noise_density) clipped to [1, num_tokens - 1];
    spans = round(noise / mean_noise_span_length) clipped to [1, noise]. Fewer than 2 tokens:
    no noise. Rounding is half-to-even, as tf.round does.
    """
    if num_tokens < 2:
        return 0, 0
    num_noise = min(max(round(num_tokens * noise_density), 1), num_tokens - 1)
    num_spans = min(max(round(num_noise / mean_noise_span_length), 1), num_noise)
    return num_noise, num_spans


def corrupted_lengths(
    num_tokens: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    target_mode: str = SPAN_TARGETS,
) -> tuple[int, int]:
    """Returns (inputs length, targets length), eos included, of a corrupted `num_tokens` doc."""
    num_noise, num_spans = noise_token_and_span_counts(
        num_tokens, noise_density, mean_noise_span_length
    )
    inputs_length = num_tokens - num_noise + num_spans + 1
    if target_mode == FULL_RECONSTRUCTION:
        targets_length = num_tokens + 1
    else:
        targets_length = num_noise + num_spans + 1
    return inputs_length, targets_length


def max_document_tokens(
    inputs_length: int | None,
    targets_length: int | None,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    target_mode: str = SPAN_TARGETS,
) -> int:
    """Returns the most raw tokens a document piece may have so that, once corrupted and given
    an eos, neither inputs nor targets exceed their lengths (None: unconstrained).

    At the defaults, inputs 512 / targets 114 give 568 (T5's figure).
    """
    _check_target_mode(target_mode)
    if inputs_length is None and targets_length is None:
        return DEFAULT_MAX_DOCUMENT_TOKENS
    limits = [limit for limit in (inputs_length, targets_length) if limit is not None]
    limit_in = math.inf if inputs_length is None else inputs_length
    limit_out = math.inf if targets_length is None else targets_length
    best = 0
    # Both lengths grow with the document; the targets are at least a tenth of it at any
    # sensible density, so 16x the larger limit bounds the search.
    for num_tokens in range(1, 16 * max(limits) + 16):
        inputs_len, targets_len = corrupted_lengths(
            num_tokens, noise_density, mean_noise_span_length, target_mode
        )
        if inputs_len <= limit_in and targets_len <= limit_out:
            best = num_tokens
    if best < 2:
        raise ValueError(
            f"Sequence lengths inputs={inputs_length}, targets={targets_length} leave room for "
            f"fewer than 2 raw tokens under target_mode={target_mode!r}; raise them (T5 uses "
            "inputs 512 / targets 114 for span targets, equal lengths for full reconstruction)."
        )
    return best


def _check_target_mode(target_mode: str) -> None:
    if target_mode not in TARGET_MODES:
        raise ValueError(f"target_mode={target_mode!r} is not one of {TARGET_MODES}.")


def _vocabulary_of(output_features: Mapping[str, seqio.Feature] | None, key: str):
    if not output_features or key not in output_features:
        raise ValueError(
            f"The preprocessor needs output_features[{key!r}] to find the vocabulary's sentinels; "
            "use it as a seqio.Task preprocessor (SeqIO passes output_features) or pass "
            "output_features explicitly."
        )
    return output_features[key].vocabulary


def check_sentinels_available(vocabulary: seqio.Vocabulary, num_sentinels_needed: int) -> None:
    """Raises ValueError when `vocabulary` has fewer extra ids than the sentinels needed."""
    extra_ids = getattr(vocabulary, "extra_ids", 0) or 0
    if num_sentinels_needed > extra_ids:
        raise ValueError(
            f"Span corruption needs up to {num_sentinels_needed} sentinels but the vocabulary has "
            f"{extra_ids} extra ids. Use a vocabulary with more extra ids (T5's has 100: "
            "seqio.SentencePieceVocabulary(path, extra_ids=100)) or shorten the sequence length "
            "so that documents are split into smaller pieces."
        )


# ---------------------------------------------------------------------------------------------
# Document splitting.
# ---------------------------------------------------------------------------------------------
def split_documents(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None = None,
    output_features: Mapping[str, seqio.Feature] | None = None,
    *,
    feature_key: str = "targets",
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    target_mode: str = SPAN_TARGETS,
    max_tokens: int | None = None,
    documents_per_group: int | None = None,
) -> tf.data.Dataset:
    """Splits tokenized documents into pieces that fit the objective's lengths; drops nothing.

    documents_per_group=None: a document of L tokens becomes ceil(L / max_tokens) near-equal
    pieces. documents_per_group=k: k consecutive documents are concatenated (T5's recipe, no
    separator) and cut into max_tokens pieces, the group's remainder a shorter last piece, so
    examples come out full. `max_tokens` defaults to `max_document_tokens` of the Task's
    sequence lengths (SeqIO passes `sequence_length`), or 568 when none is known. Empty
    documents are removed; other features are dropped.
    Returns a dataset of {feature_key: int32 [piece_length]}.
    """
    if max_tokens is None:
        sequence_length = sequence_length or {}
        max_tokens = max_document_tokens(
            sequence_length.get("inputs"),
            sequence_length.get("targets"),
            noise_density,
            mean_noise_span_length,
            target_mode,
        )
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}.")
    if output_features and feature_key in output_features:
        _, max_spans = noise_token_and_span_counts(
            max_tokens, noise_density, mean_noise_span_length
        )
        check_sentinels_available(output_features[feature_key].vocabulary, max_spans)

    def split_into_pieces(features):
        tokens = tf.cast(features[feature_key], tf.int32)
        length = tf.size(tokens)
        num_pieces = tf.maximum((length + max_tokens - 1) // max_tokens, 1)
        # Piece i gets floor(L/k) tokens plus one for the first L mod k pieces.
        base, remainder = length // num_pieces, length % num_pieces
        piece_lengths = base + tf.cast(tf.range(num_pieces) < remainder, tf.int32)
        return {feature_key: tf.RaggedTensor.from_row_lengths(tokens, piece_lengths)}

    def cut_group_into_pieces(features):
        tokens = features[feature_key].flat_values
        length = tf.size(tokens)
        num_full = length // max_tokens
        remainder = length - num_full * max_tokens
        piece_lengths = tf.concat(
            [
                tf.fill([num_full], max_tokens),
                tf.reshape(remainder, [1])[: tf.minimum(remainder, 1)],
            ],
            axis=0,
        )
        return {feature_key: tf.RaggedTensor.from_row_lengths(tokens, piece_lengths)}

    dataset = dataset.map(
        lambda features: {feature_key: tf.cast(features[feature_key], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = dataset.filter(lambda features: tf.size(features[feature_key]) > 0)
    if documents_per_group is None:
        return dataset.map(split_into_pieces, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    if documents_per_group < 1:
        raise ValueError(
            f"documents_per_group must be positive or None, got {documents_per_group}."
        )
    dataset = dataset.ragged_batch(documents_per_group)
    return dataset.map(cut_group_into_pieces, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


# ---------------------------------------------------------------------------------------------
# Span corruption (T5's rule, written afresh).
# ---------------------------------------------------------------------------------------------
def _seed_pair(seed) -> tf.Tensor:
    return tf.cast(tf.stack(seed) if isinstance(seed, (tuple, list)) else seed, tf.int64)


def _random_composition(num_items: tf.Tensor, num_parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Returns int32 [num_parts] lengths >= 1 summing to num_items, uniform over all such splits.

    num_parts - 1 cut points are drawn without replacement among the num_items - 1 gaps.
    With num_items == 0 (and num_parts == 1) returns [0].
    """
    num_gaps = tf.maximum(num_items - 1, 0)
    scores = tf.random.stateless_uniform([num_gaps], seed=seed)
    _, cut_gaps = tf.math.top_k(scores, k=num_parts - 1, sorted=False)
    is_part_start = tf.scatter_nd(
        tf.expand_dims(cut_gaps + 1, 1), tf.ones_like(cut_gaps), [num_items]
    )
    part_of_item = tf.cumsum(is_part_start)
    return tf.math.bincount(part_of_item, minlength=num_parts, maxlength=num_parts, dtype=tf.int32)


def _noise_counts_tf(num_tokens: tf.Tensor, noise_density: float, mean_span: float):
    """TensorFlow twin of noise_token_and_span_counts (float64, half-to-even rounding)."""
    length = tf.cast(num_tokens, tf.float64)
    num_noise = tf.cast(tf.round(length * noise_density), tf.int32)
    num_noise = tf.minimum(tf.maximum(num_noise, 1), num_tokens - 1)
    num_noise = tf.maximum(num_noise, 0)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_span), tf.int32)
    num_spans = tf.minimum(tf.maximum(num_spans, 1), num_noise)
    return num_noise, num_spans


def corrupt_spans(
    tokens: tf.Tensor,
    seed: tf.Tensor,
    vocab_size: int,
    num_sentinels: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    target_mode: str = SPAN_TARGETS,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Span-corrupts one int32 [length] token sequence; returns (inputs, targets), no eos.

    The sequence is cut into alternating non-noise / noise spans (first non-noise, last noise,
    as T5), span lengths a uniformly random composition of each total. Noise span k becomes
    the sentinel vocab_size - 1 - k in the inputs; the targets are each sentinel followed by
    its span (or, for full reconstruction, the original tokens).
    """
    tokens = tf.cast(tokens, tf.int32)
    num_tokens = tf.size(tokens)
    num_noise, num_spans = _noise_counts_tf(num_tokens, noise_density, mean_noise_span_length)
    tf.debugging.assert_less_equal(
        num_spans,
        num_sentinels,
        message=(
            "span corruption needs more sentinels than the vocabulary's extra ids; split "
            "documents shorter (split_documents) or use a vocabulary with more extra ids"
        ),
    )
    num_parts = tf.maximum(num_spans, 1)
    noise_seed, nonnoise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    noise_span_lengths = _random_composition(num_noise, num_parts, noise_seed)
    nonnoise_span_lengths = _random_composition(num_tokens - num_noise, num_parts, nonnoise_seed)
    interleaved_lengths = tf.reshape(
        tf.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [-1]
    )
    span_of_token = tf.repeat(tf.range(2 * num_parts), interleaved_lengths)
    is_noise = tf.equal(span_of_token % 2, 1)
    is_span_start = tf.concat(
        [tf.ones([1], tf.bool), tf.not_equal(span_of_token[1:], span_of_token[:-1])], axis=0
    )[:num_tokens]
    starts_noise_span = is_noise & is_span_start
    sentinel_of_token = vocab_size - 1 - span_of_token // 2

    inputs = tf.boolean_mask(
        tf.where(starts_noise_span, sentinel_of_token, tokens),
        tf.logical_or(tf.logical_not(is_noise), starts_noise_span),
    )
    if target_mode == FULL_RECONSTRUCTION:
        targets = tokens
    else:
        # Each noise token contributes [sentinel if it starts its span, itself].
        candidates = tf.stack([sentinel_of_token, tokens], axis=1)
        keep = tf.stack([starts_noise_span, is_noise], axis=1)
        targets = tf.boolean_mask(tf.reshape(candidates, [-1]), tf.reshape(keep, [-1]))
    return inputs, targets


def span_corruption(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    target_mode: str = SPAN_TARGETS,
    feature_key: str = "targets",
) -> tf.data.Dataset:
    """T5 span corruption as a SeqIO preprocessor (random; seeded by SeqIO's map seeds).

    Reads tokenized text from `feature_key`; emits `inputs` (sentinels in place of noise
    spans) and `targets` (sentinel + span ..., or the whole text for full reconstruction),
    both int32 and without eos (append it afterwards). Sentinels are the vocabulary of
    output_features['targets']'s extra ids, <extra_id_0> = vocab_size - 1 downward.
    """
    _check_target_mode(target_mode)
    vocabulary = _vocabulary_of(output_features, "targets")
    check_sentinels_available(vocabulary, 1)

    @seqio.map_over_dataset(num_seeds=1)
    def corrupt(features, seed):
        inputs, targets = corrupt_spans(
            features[feature_key],
            _seed_pair(seed),
            vocabulary.vocab_size,
            vocabulary.extra_ids,
            noise_density,
            mean_noise_span_length,
            target_mode,
        )
        return {"inputs": inputs, "targets": targets}

    return corrupt(dataset)


def full_reconstruction(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    feature_key: str = "targets",
) -> tf.data.Dataset:
    """BART-style text infilling: span-corrupted `inputs`, the original text as `targets`."""
    return span_corruption(
        dataset,
        output_features,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        target_mode=FULL_RECONSTRUCTION,
        feature_key=feature_key,
    )


# ---------------------------------------------------------------------------------------------
# E2S2's second view: trigram shuffle, then random replacement.
# ---------------------------------------------------------------------------------------------
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
    _check_target_mode(target_mode)
    vocabulary = _vocabulary_of(output_features, "targets")
    check_sentinels_available(vocabulary, 1)

    @seqio.map_over_dataset(num_seeds=1)
    def make_views(features, seed):
        corruption_seed, view_seed = tf.unstack(
            tf.random.experimental.stateless_split(_seed_pair(seed), 2)
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


# ---------------------------------------------------------------------------------------------
# Output features and the shared chain.
# ---------------------------------------------------------------------------------------------
def pretraining_output_features(
    vocabulary: seqio.Vocabulary, with_noised_view: bool = False
) -> dict[str, seqio.Feature]:
    """Returns the Task output features: inputs/targets, plus E2S2's view N and labels."""
    features = {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }
    if with_noised_view:
        features["inputs_noised"] = seqio.Feature(vocabulary=vocabulary, add_eos=True)
        features["noise_labels"] = seqio.Feature(vocabulary=NOISE_LABELS_VOCABULARY, add_eos=True)
    return features


OBJECTIVES = {
    "span_corruption": (span_corruption, SPAN_TARGETS),
    "full_reconstruction": (span_corruption, FULL_RECONSTRUCTION),
    "e2s2": (e2s2_views, SPAN_TARGETS),
    "e2s2_full_reconstruction": (e2s2_views, FULL_RECONSTRUCTION),
}


def objective_has_noised_view(objective: str) -> bool:
    """Returns True for the objectives whose examples carry inputs_noised and noise_labels."""
    return objective in OBJECTIVES and OBJECTIVES[objective][0] is e2s2_views


def pretraining_preprocessors(
    objective: str,
    *,
    text_key: str = "text",
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    documents_per_group: int | None = 128,
    **objective_options,
) -> list:
    """Returns the Task preprocessors: rekey text -> tokenize -> split -> objective -> eos.

    objective: one of OBJECTIVES ('span_corruption', 'full_reconstruction', 'e2s2',
    'e2s2_full_reconstruction'). documents_per_group: see split_documents (128 concatenates
    documents as T5 does, so examples are full; None keeps documents apart for packing).
    Extra keyword options go to the objective's preprocessor (e2s2: shuffle/replace ratios).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {sorted(OBJECTIVES)}.")
    objective_fn, target_mode = OBJECTIVES[objective]
    noise_options = dict(
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        target_mode=target_mode,
    )
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
        seqio.preprocessors.tokenize,
        functools.partial(
            split_documents, documents_per_group=documents_per_group, **noise_options
        ),
        functools.partial(objective_fn, **noise_options, **objective_options),
        seqio.preprocessors.append_eos_after_trim,
    ]


# ---------------------------------------------------------------------------------------------
# SSR records.
# ---------------------------------------------------------------------------------------------
SSR_FEATURE_DESCRIPTION = {
    "inputs": tf.io.FixedLenFeature([], tf.string),
    "targets": tf.io.FixedLenFeature([], tf.string),
    "fill_score": tf.io.FixedLenFeature([], tf.float32),
}


def ssr_task_source(
    split_to_filepattern: Mapping[str, str | Iterable[str]],
    num_input_examples: Mapping[str, int] | None = None,
) -> seqio.TFExampleDataSource:
    """Returns a source over SSR TFRecords of tf.train.Example with string `inputs`, `targets`
    (sentinel-marked text, exact around the spans: a sentinel may be glued to the previous word,
    so tokenize them with `ssr_preprocessors`) and float `fill_score` (the generator's mean fill
    log-probability).
    """
    return seqio.TFExampleDataSource(
        split_to_filepattern=dict(split_to_filepattern),
        feature_description=SSR_FEATURE_DESCRIPTION,
        num_input_examples=num_input_examples,
    )


# A sentinel right after a non-space character, as in the record of a span that starts right
# after a word (`dog.` with `.` masked gives `dog<extra_id_0> FILL <extra_id_1>`). Only the
# sentinel's head is matched, so a sentinel right after another one is matched too.
_GLUED_SENTINEL = r"(\S)(<extra_id_\d)"


@seqio.map_over_dataset
def space_glued_sentinels(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Returns the SSR record with a space before every sentinel glued to the previous word in
    `inputs` and `targets`, the rest of the text unchanged. SentencePiece knows sentinel k only
    as the piece `▁<extra_id_k>`, so `dog<extra_id_0>` would tokenize into ordinary pieces."""
    spaced = {
        key: tf.strings.regex_replace(features[key], _GLUED_SENTINEL, r"\1 \2")
        for key in ("inputs", "targets")
    }
    return {**features, **spaced}


def ssr_preprocessors() -> list:
    """Returns the Task preprocessors for SSR records: space glued sentinels (so each becomes
    its id), tokenize, then append eos."""
    return [
        space_glued_sentinels,
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos_after_trim,
    ]
