"""Self-evolution masking (issue 28 part 3): T5 span corruption whose noise spans favour the
tokens a model found hard, given as a per-token float feature aligned with the tokens
(`informativeness`, written by `python -m e2s2_jax.main score-tokens`).

Each example draws `num_candidates` layouts by T5's rule (`span_corruption.random_span_layout`:
the same noise-token and span counts, the same span-length law) and picks one with probability
`softmax(score / temperature)`, `score` the mean standardised informativeness of the tokens the
layout masks. Noise density and mean span length are therefore exactly span corruption's;
only where the spans fall changes. Temperature -> infinity gives T5's random masking.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from e2s2_jax.data import span_corruption
from e2s2_jax.data.feature_converters import REFERENCE_TASK_FEATURE

INFORMATIVENESS = "informativeness"
REFERENCE_INPUTS = REFERENCE_TASK_FEATURE


def informed_span_layout(
    informativeness: tf.Tensor,
    seed: tf.Tensor,
    num_noise: tf.Tensor,
    num_spans: tf.Tensor,
    *,
    num_candidates: int,
    temperature: float,
) -> tf.Tensor:
    """Returns int32 [length] span ids (odd: noise) of the layout chosen among `num_candidates`
    T5 layouts of float [length] `informativeness`, weighted by their masked tokens' mean
    standardised informativeness (`softmax(score / temperature)`)."""
    informativeness = tf.cast(informativeness, tf.float32)
    num_tokens = tf.size(informativeness)
    mean, variance = tf.nn.moments(informativeness, axes=[0])
    standardised = (informativeness - mean) * tf.math.rsqrt(variance + 1e-12)
    seeds = tf.random.experimental.stateless_split(seed, num_candidates + 1)
    layouts = tf.map_fn(
        lambda candidate_seed: span_corruption.random_span_layout(
            num_tokens, num_noise, num_spans, candidate_seed
        ),
        seeds[1:],
        fn_output_signature=tf.TensorSpec([None], tf.int32),
    )  # [candidates, length]
    is_noise = tf.cast(tf.equal(layouts % 2, 1), tf.float32)
    scores = tf.reduce_sum(is_noise * standardised[None], axis=1) / tf.cast(
        tf.maximum(num_noise, 1), tf.float32
    )
    choice = tf.random.stateless_categorical(
        (scores / temperature)[None], 1, seed=seeds[0], dtype=tf.int32
    )[0, 0]
    return layouts[choice]


def informed_span_corruption(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    num_candidates: int = 16,
    temperature: float = 0.05,
    feature_key: str = "targets",
    informativeness_key: str = INFORMATIVENESS,
) -> tf.data.Dataset:
    """Span corruption with informativeness-weighted noise spans, as a SeqIO preprocessor.

    Reads int32 tokens from `feature_key` and a float feature of the same length from
    `informativeness_key`; emits `inputs` and `targets` as `span_corruption.span_corruption`
    (sentinels from output_features['targets']'s extra ids, no eos), and the tokens before
    corruption as `reference_inputs` (the input of rectified label smoothing's reference
    prediction, `losses.rectified_cross_entropy_with_logits`). `num_candidates` T5 layouts
    are drawn per example, one kept with probability `softmax(mean standardised masked
    informativeness / temperature)`: 0.05 strongly prefers the best of 16 (a random layout's
    score has a standard deviation of about 1 / sqrt(noise tokens), 0.1 at 100 noise tokens).
    """
    if num_candidates < 1:
        raise ValueError(
            f"informed_span_corruption.num_candidates={num_candidates}: use at least 1 "
            "(1 is T5's random masking; 16 is the default)."
        )
    if temperature <= 0:
        raise ValueError(
            f"informed_span_corruption.temperature={temperature}: use a positive value "
            "(0.05 by default; larger is closer to random masking)."
        )
    vocabulary = span_corruption.vocabulary_of(output_features, "targets")
    span_corruption.check_sentinels_available(vocabulary, 1)

    @seqio.map_over_dataset(num_seeds=1)
    def corrupt(features, seed):
        tokens = tf.cast(features[feature_key], tf.int32)
        informativeness = features[informativeness_key]
        tf.debugging.assert_equal(
            tf.size(informativeness),
            tf.size(tokens),
            message=f"{informativeness_key} must have one value per token of {feature_key}",
        )
        num_noise, num_spans = span_corruption.noise_counts_tf(
            tf.size(tokens), noise_density, mean_noise_span_length
        )
        span_corruption.check_sentinel_budget(num_spans, vocabulary.extra_ids)
        span_of_token = informed_span_layout(
            informativeness,
            span_corruption.seed_pair(seed),
            num_noise,
            num_spans,
            num_candidates=num_candidates,
            temperature=temperature,
        )
        inputs, targets = span_corruption.corrupt_with_layout(
            tokens, span_of_token, vocabulary.vocab_size
        )
        return {"inputs": inputs, "targets": targets, REFERENCE_INPUTS: tokens}

    return corrupt(dataset)


def split_scored_pieces(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None = None,
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    feature_key: str = "targets",
    informativeness_key: str = INFORMATIVENESS,
) -> tf.data.Dataset:
    """Cuts each scored example into ceil(L / max) near-equal pieces of at most
    `span_corruption.max_document_tokens` of the task's lengths, tokens and informativeness
    alike (as `preprocessors.split_documents` without grouping); other features are dropped."""
    sequence_length = sequence_length or {}
    max_tokens = span_corruption.max_document_tokens(
        sequence_length.get("inputs"),
        sequence_length.get("targets"),
        noise_density,
        mean_noise_span_length,
    )

    def split_into_pieces(features):
        length = tf.size(features[feature_key])
        num_pieces = tf.maximum((length + max_tokens - 1) // max_tokens, 1)
        base, remainder = length // num_pieces, length % num_pieces
        piece_lengths = base + tf.cast(tf.range(num_pieces) < remainder, tf.int32)
        return {
            key: tf.RaggedTensor.from_row_lengths(features[key], piece_lengths)
            for key in (feature_key, informativeness_key)
        }

    dataset = dataset.filter(lambda features: tf.size(features[feature_key]) > 1)
    return dataset.map(split_into_pieces, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
