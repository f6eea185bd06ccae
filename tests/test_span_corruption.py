"""Tests of span corruption and full reconstruction against NumPy references and statistical
bounds, and of the length arithmetic that sizes documents for them."""

import math

import numpy as np
import pytest
from preprocessor_helpers import (
    PIECES,
    bundled_lines,
    is_sentinel,
    run,
    token_dataset,
    uncorrupt,
)

from e2s2_jax.data import span_corruption
from e2s2_jax.data.preprocessors import pretraining_output_features


@pytest.fixture(scope="module")
def corpus_lines():
    return list(bundled_lines())


def test_lengths_match_t5_recipe():
    assert span_corruption.max_document_tokens(512, 114) == 568
    assert span_corruption.corrupted_lengths(568) == (512, 114)
    # Full reconstruction needs room for the whole text plus eos in the targets.
    assert span_corruption.max_document_tokens(512, 512, target_mode="full_reconstruction") == 511


def test_span_corruption_round_trips_text(vocabulary, corpus_lines):
    documents = [vocabulary.encode(line) for line in corpus_lines[:300]]
    documents = [doc for doc in documents if len(doc) >= 2]
    features = pretraining_output_features(vocabulary)
    outputs = run(span_corruption.span_corruption, documents, features, seed=3)
    assert len(outputs) == len(documents)
    for doc, example in zip(documents, outputs, strict=True):
        restored = uncorrupt(example["inputs"], example["targets"], vocabulary)
        np.testing.assert_array_equal(restored, doc)
        sentinels = example["inputs"][is_sentinel(example["inputs"], vocabulary)]
        # Sentinels count down from <extra_id_0> = vocab_size - 1.
        expected = vocabulary.vocab_size - 1 - np.arange(len(sentinels))
        np.testing.assert_array_equal(sentinels, expected)
        assert vocabulary.decode(restored.tolist()) == vocabulary.decode(list(doc))


def test_span_corruption_statistics(vocabulary):
    """Over 10k examples: density and mean span length within 2%; span lengths follow the
    uniform-composition law of T5's segmentation; spans alternate starting with non-noise."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 569, size=10_000)
    documents = [rng.integers(3, PIECES, size=n) for n in lengths]
    features = pretraining_output_features(vocabulary)
    outputs = run(span_corruption.span_corruption, documents, features, seed=1)

    noise_tokens = spans = 0
    noise_span_lengths = []
    for doc, example in zip(documents, outputs, strict=True):
        assert len(example["inputs"]) + len(example["targets"]) - 2 * int(
            is_sentinel(example["targets"], vocabulary).sum()
        ) == len(doc)
        inputs, targets = example["inputs"], example["targets"]
        target_sentinels = is_sentinel(targets, vocabulary)
        spans += int(target_sentinels.sum())
        noise_tokens += int((~target_sentinels).sum())
        assert not is_sentinel(inputs[0], vocabulary)  # T5's layout: non-noise first ...
        assert is_sentinel(inputs[-1], vocabulary)  # ... and a noise span last
        starts = np.flatnonzero(target_sentinels)
        noise_span_lengths.extend(np.diff(np.append(starts, len(targets))) - 1)
    density = noise_tokens / lengths.sum()
    mean_span_length = noise_tokens / spans
    assert abs(density - 0.15) / 0.15 < 0.02, density
    assert abs(mean_span_length - 3.0) / 3.0 < 0.02, mean_span_length
    assert min(noise_span_lengths) >= 1


def test_noise_span_lengths_follow_uniform_composition(vocabulary):
    """568 tokens: 85 noise tokens in 28 spans; P(span = j) = C(85-j-1, 26) / C(84, 27)."""
    rng = np.random.default_rng(1)
    documents = [rng.integers(3, PIECES, size=568) for _ in range(1500)]
    features = pretraining_output_features(vocabulary)
    outputs = run(span_corruption.span_corruption, documents, features, seed=2)
    span_lengths = []
    for example in outputs:
        targets = example["targets"]
        starts = np.flatnonzero(is_sentinel(targets, vocabulary))
        assert len(starts) == 28 and len(targets) == 85 + 28
        span_lengths.extend(np.diff(np.append(starts, len(targets))) - 1)
    observed = np.bincount(span_lengths, minlength=60)[1:58] / len(span_lengths)
    expected = np.array(
        [math.comb(85 - j - 1, 26) / math.comb(84, 27) for j in range(1, 58)], np.float64
    )
    assert np.abs(observed - expected).sum() / 2 < 0.02  # total variation distance


def test_full_reconstruction_targets_are_the_text(vocabulary, corpus_lines):
    documents = [vocabulary.encode(line) for line in corpus_lines[:100]]
    documents = [doc for doc in documents if len(doc) >= 2]
    features = pretraining_output_features(vocabulary)
    outputs = run(span_corruption.full_reconstruction, documents, features, seed=4)
    for doc, example in zip(documents, outputs, strict=True):
        np.testing.assert_array_equal(example["targets"], doc)
        num_noise, num_spans = span_corruption.noise_token_and_span_counts(len(doc))
        assert is_sentinel(example["inputs"], vocabulary).sum() == num_spans
        assert len(example["inputs"]) == len(doc) - num_noise + num_spans


def test_bad_target_mode_is_rejected(vocabulary):
    with pytest.raises(ValueError, match="target_mode"):
        span_corruption.span_corruption(
            token_dataset([[5, 6, 7]]),
            pretraining_output_features(vocabulary),
            target_mode="whole",
        )
