"""T5 span corruption, written afresh, and BART-style full reconstruction as SeqIO
preprocessors, with the length arithmetic that sizes documents for them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import seqio
import tensorflow as tf

SPAN_TARGETS = "spans"
FULL_RECONSTRUCTION = "full_reconstruction"
TARGET_MODES = (SPAN_TARGETS, FULL_RECONSTRUCTION)

# T5's recipe: 568 raw tokens give inputs of 512 and targets of 114 (both with eos) at the
# default noise density and span length; used when no sequence length is known.
DEFAULT_MAX_DOCUMENT_TOKENS = 568


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
    check_target_mode(target_mode)
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


def check_target_mode(target_mode: str) -> None:
    """Raises ValueError unless `target_mode` is one of TARGET_MODES."""
    if target_mode not in TARGET_MODES:
        raise ValueError(f"target_mode={target_mode!r} is not one of {TARGET_MODES}.")


def vocabulary_of(
    output_features: Mapping[str, seqio.Feature] | None, key: str
) -> seqio.Vocabulary:
    """Returns output_features[key]'s vocabulary (whose extra ids are the sentinels), or raises
    ValueError naming what is missing."""
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
# Span corruption (T5's rule, written afresh).
# ---------------------------------------------------------------------------------------------
def seed_pair(seed) -> tf.Tensor:
    """Returns SeqIO's map seed as the int64 [2] seed of TensorFlow's stateless random ops."""
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


def noise_counts_tf(num_tokens: tf.Tensor, noise_density: float, mean_span: float):
    """TensorFlow twin of noise_token_and_span_counts (float64, half-to-even rounding)."""
    length = tf.cast(num_tokens, tf.float64)
    num_noise = tf.cast(tf.round(length * noise_density), tf.int32)
    num_noise = tf.minimum(tf.maximum(num_noise, 1), num_tokens - 1)
    num_noise = tf.maximum(num_noise, 0)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_span), tf.int32)
    num_spans = tf.minimum(tf.maximum(num_spans, 1), num_noise)
    return num_noise, num_spans


def check_sentinel_budget(num_spans: tf.Tensor, num_sentinels: int) -> None:
    """Asserts (in the graph) that `num_spans` sentinels exist among the extra ids."""
    tf.debugging.assert_less_equal(
        num_spans,
        num_sentinels,
        message=(
            "span corruption needs more sentinels than the vocabulary's extra ids; split "
            "documents shorter (split_documents) or use a vocabulary with more extra ids"
        ),
    )


def random_span_layout(
    num_tokens: tf.Tensor, num_noise: tf.Tensor, num_spans: tf.Tensor, seed: tf.Tensor
) -> tf.Tensor:
    """Returns int32 [num_tokens]: the span of each token in T5's layout, alternating
    non-noise (even) / noise (odd) spans, first non-noise, last noise; the lengths of each kind
    a uniformly random composition of its total."""
    num_parts = tf.maximum(num_spans, 1)
    noise_seed, nonnoise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    noise_span_lengths = _random_composition(num_noise, num_parts, noise_seed)
    nonnoise_span_lengths = _random_composition(num_tokens - num_noise, num_parts, nonnoise_seed)
    interleaved_lengths = tf.reshape(
        tf.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [-1]
    )
    return tf.repeat(tf.range(2 * num_parts), interleaved_lengths)


def corrupt_with_layout(
    tokens: tf.Tensor, span_of_token: tf.Tensor, vocab_size: int, target_mode: str = SPAN_TARGETS
) -> tuple[tf.Tensor, tf.Tensor]:
    """Span-corrupts int32 [length] `tokens` whose spans are `span_of_token` (odd: noise);
    returns (inputs, targets), no eos. Noise span k becomes the sentinel vocab_size - 1 - k in
    the inputs; the targets are each sentinel followed by its span (or, for full
    reconstruction, the original tokens)."""
    num_tokens = tf.size(tokens)
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


def corrupt_spans(
    tokens: tf.Tensor,
    seed: tf.Tensor,
    vocab_size: int,
    num_sentinels: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    target_mode: str = SPAN_TARGETS,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Span-corrupts one int32 [length] token sequence in T5's random layout
    (`random_span_layout`, `corrupt_with_layout`); returns (inputs, targets), no eos."""
    tokens = tf.cast(tokens, tf.int32)
    num_tokens = tf.size(tokens)
    num_noise, num_spans = noise_counts_tf(num_tokens, noise_density, mean_noise_span_length)
    check_sentinel_budget(num_spans, num_sentinels)
    span_of_token = random_span_layout(num_tokens, num_noise, num_spans, seed)
    return corrupt_with_layout(tokens, span_of_token, vocab_size, target_mode)


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
    check_target_mode(target_mode)
    vocabulary = vocabulary_of(output_features, "targets")
    check_sentinels_available(vocabulary, 1)

    @seqio.map_over_dataset(num_seeds=1)
    def corrupt(features, seed):
        inputs, targets = corrupt_spans(
            features[feature_key],
            seed_pair(seed),
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
