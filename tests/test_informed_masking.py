"""Self-evolution masking's preprocessor against span corruption over 10k examples: the same
noise density and mean span length, masked tokens more informative than random masking's, and
every example restored exactly by the NumPy reference (`uncorrupt`)."""

import numpy as np
import pytest
import seqio
import tensorflow as tf
from preprocessor_helpers import PIECES, is_sentinel, run, uncorrupt

from e2s2_jax.data import informed_masking, span_corruption
from e2s2_jax.data.preprocessors import pretraining_output_features


def scored_dataset(documents, informativeness):
    return tf.data.Dataset.from_generator(
        lambda: (
            {"targets": np.asarray(doc, np.int32), "informativeness": np.asarray(info, np.float32)}
            for doc, info in zip(documents, informativeness, strict=True)
        ),
        output_signature={
            "targets": tf.TensorSpec([None], tf.int32),
            "informativeness": tf.TensorSpec([None], tf.float32),
        },
    )


def masked_statistics(documents, informativeness, outputs, vocabulary):
    """NumPy check of each output: restores the document (`uncorrupt`) and returns (noise
    tokens, noise spans, summed informativeness of the masked tokens) over all examples."""
    noise_tokens = spans = 0
    masked_informativeness = 0.0
    for doc, info, example in zip(documents, informativeness, outputs, strict=True):
        inputs, targets = example["inputs"], example["targets"]
        np.testing.assert_array_equal(uncorrupt(inputs, targets, vocabulary), doc)
        span_lengths = (
            np.diff(np.append(np.flatnonzero(is_sentinel(targets, vocabulary)), len(targets))) - 1
        )
        # Each input position stands for one token, or a sentinel for its whole span.
        input_is_sentinel = is_sentinel(inputs, vocabulary)
        covered = np.ones(len(inputs), np.int64)
        covered[input_is_sentinel] = span_lengths[
            vocabulary.vocab_size - 1 - inputs[input_is_sentinel]
        ]
        masked = np.repeat(input_is_sentinel, covered)
        assert len(masked) == len(doc)
        noise_tokens += int(masked.sum())
        spans += int(is_sentinel(targets, vocabulary).sum())
        masked_informativeness += float(info[masked].sum())
    return noise_tokens, spans, masked_informativeness


def test_informed_masking_keeps_t5_statistics_and_masks_informative_tokens(vocabulary):
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 201, size=10_000)
    documents = [rng.integers(3, PIECES, size=n) for n in lengths]
    # Per-token losses of a model are skewed (most tokens easy, a few hard): a gamma draw.
    informativeness = [rng.gamma(1.0, 2.0, size=n).astype(np.float32) for n in lengths]
    features = pretraining_output_features(vocabulary)
    random_outputs = run(span_corruption.span_corruption, documents, features, seed=1)
    with seqio.utils.map_seed_manager(1):
        informed = informed_masking.informed_span_corruption(
            scored_dataset(documents, informativeness), features
        )
    informed_outputs = list(informed.as_numpy_iterator())

    total = int(lengths.sum())
    figures = {}
    for name, outputs in (("random", random_outputs), ("informed", informed_outputs)):
        noise, spans, masked_info = masked_statistics(
            documents, informativeness, outputs, vocabulary
        )
        figures[name] = {
            "density": noise / total,
            "mean_span": noise / spans,
            "masked_informativeness": masked_info / noise,
        }
    all_mean = float(np.concatenate(informativeness).mean())
    print(
        f"\nself-evolution masking over 10k examples (all tokens' mean informativeness "
        f"{all_mean:.3f}): {figures}"
    )
    for key in ("density", "mean_span"):
        assert (
            abs(figures["informed"][key] - figures["random"][key]) / figures["random"][key] < 0.02
        ), key
    assert abs(figures["random"]["density"] - 0.15) / 0.15 < 0.02
    assert abs(figures["random"]["mean_span"] - 3.0) / 3.0 < 0.02
    # Random masking's masked mean is the corpus mean; informed masking's is clearly above it
    # (the standard error of 10k examples' masked mean is ~0.01 here).
    assert abs(figures["random"]["masked_informativeness"] - all_mean) < 0.05
    assert figures["informed"]["masked_informativeness"] > all_mean + 0.2


def test_bad_settings_and_misaligned_informativeness_stop(vocabulary):
    features = pretraining_output_features(vocabulary)
    dataset = scored_dataset([np.arange(3, 40)], [np.ones(30, np.float32)])
    with pytest.raises(ValueError, match="num_candidates"):
        informed_masking.informed_span_corruption(dataset, features, num_candidates=0)
    with pytest.raises(ValueError, match="temperature"):
        informed_masking.informed_span_corruption(dataset, features, temperature=0.0)
    with seqio.utils.map_seed_manager(0):
        misaligned = informed_masking.informed_span_corruption(dataset, features)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one value per token"):
        list(misaligned.as_numpy_iterator())
