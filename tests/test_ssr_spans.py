"""SSR span sampling against METHODS.md section 2: statistics over 10k documents, no touching
spans, uniform placement (against exhaustive enumeration), determinism, record text shapes."""

from __future__ import annotations

import collections
import itertools
import re

import numpy as np
import pytest

from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES
from e2s2_jax.data.text_source import read_text_documents
from e2s2_jax.ssr import spans


@pytest.fixture(scope="module")
def documents():
    """10k documents of 20-300 words cut from the bundled corpus (paragraphs, or windows)."""
    paragraphs = [
        text
        for text in itertools.islice(read_text_documents(BUNDLED_TRAIN_FILES), 4000)
        if len(spans.word_offsets(text)) >= 20
    ]
    rng = np.random.default_rng(0)
    out = []
    while len(out) < 10_000:
        text = paragraphs[len(out) % len(paragraphs)]
        words = spans.word_offsets(text)
        start = int(rng.integers(0, max(1, len(words) - 20)))
        end = min(len(words), start + int(rng.integers(20, 300)))
        out.append(text[words[start, 0] : words[end - 1, 1]])
    return out


def test_statistics_over_10k_documents(documents):
    total_words = total_spans = total_masked = 0
    span_lengths = []
    for example_id, text in enumerate(documents):
        num_words = len(spans.word_offsets(text))
        word_spans = spans.sample_word_spans(num_words, spans.example_rng(3, example_id))
        assert len(word_spans) >= 1
        assert np.all(word_spans[:, 1] > word_spans[:, 0])
        assert word_spans[0, 0] >= 0 and word_spans[-1, 1] <= num_words
        # Never overlapping or touching: at least one unmasked word between two spans.
        assert np.all(word_spans[1:, 0] >= word_spans[:-1, 1] + 1)
        lengths = word_spans[:, 1] - word_spans[:, 0]
        total_words += num_words
        total_spans += len(word_spans)
        total_masked += int(lengths.sum())
        span_lengths += lengths.tolist()
    spans_per_word = total_spans / total_words
    mean_length = float(np.mean(span_lengths))
    masked_fraction = total_masked / total_words
    # Spec: round(0.075 n) +- 1 spans; max(1, Poisson(3)) has mean 3 + e^-3 = 3.0498.
    assert 0.072 < spans_per_word < 0.080, spans_per_word
    assert 2.95 < mean_length < 3.10, mean_length
    assert 0.20 <= masked_fraction <= 0.26, masked_fraction
    # The Poisson shape: P(length 1) = P(0) + P(1) = 4 e^-3 = 0.199; P(3) = 4.5 e^-3 = 0.224.
    counts = collections.Counter(span_lengths)
    assert abs(counts[1] / len(span_lengths) - 4 * np.exp(-3)) < 0.015
    assert abs(counts[3] / len(span_lengths) - 4.5 * np.exp(-3)) < 0.015


def test_span_count_per_document_length():
    rng = np.random.default_rng(1)
    for num_words in (1, 2, 5, 40, 200, 1000):
        counts = {len(spans.sample_word_spans(num_words, rng)) for _ in range(300)}
        expected = round(0.075 * num_words)
        if num_words >= 40:  # the spans always fit: exactly round(0.075 n) - 1, +0, +1
            assert counts == {expected - 1, expected, expected + 1}
        else:
            assert min(counts) == 1 and max(counts) <= expected + 1


def test_placement_is_uniform_among_non_touching_placements():
    """Conditioned on the span lengths, every valid placement is equally likely: compare with
    an exhaustive enumeration of the placements of 1 + 2 + ... spans in 12 words."""
    num_words = 12
    rng = np.random.default_rng(2)
    by_lengths = collections.defaultdict(collections.Counter)
    for _ in range(60_000):
        word_spans = spans.sample_word_spans(num_words, rng)
        lengths = tuple((word_spans[:, 1] - word_spans[:, 0]).tolist())
        by_lengths[lengths][tuple(word_spans[:, 0].tolist())] += 1
    lengths, placements = max(by_lengths.items(), key=lambda item: sum(item[1].values()))
    valid = [
        starts
        for starts in itertools.combinations(range(num_words), len(lengths))
        if all(s + n <= num_words for s, n in zip(starts, lengths, strict=True))
        and all(starts[i + 1] >= starts[i] + lengths[i] + 1 for i in range(len(lengths) - 1))
    ]
    assert set(placements) == set(valid)
    total = sum(placements.values())
    expected = total / len(valid)
    chi2 = sum((placements[s] - expected) ** 2 / expected for s in valid)
    # chi-square with len(valid)-1 degrees of freedom: mean dof, sd sqrt(2 dof); 5 sd is generous.
    dof = len(valid) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof, total)


def test_spans_depend_only_on_seed_and_example_id():
    text = "It is a truth universally acknowledged, that a single man in possession of a good "
    text += "fortune, must be in want of a wife."
    first = spans.sample_char_spans(text, seed=7, example_id=42)
    assert np.array_equal(first, spans.sample_char_spans(text, seed=7, example_id=42))
    others = [spans.sample_char_spans(text, seed=7, example_id=i) for i in range(20)]
    assert any(not np.array_equal(first, other) for other in others)


def test_record_text_shapes_restore_the_original():
    text = "Sir John's satisfaction in society was much more real; he delighted in it."
    char_spans = spans.sample_char_spans(text, seed=0, example_id=5)
    originals = spans.span_texts(text, char_spans)
    # Spans cover whole words: they start and end at word boundaries.
    for start, end in char_spans.tolist():
        assert start == 0 or not text[start - 1].isalnum()
        assert end == len(text) or not text[end].isalnum()
    fills = [f"fill number {k}" for k in range(len(originals))]
    inputs = spans.ssr_inputs(text, char_spans, fills)
    targets = spans.ssr_targets(originals)
    n = len(originals)
    assert targets.startswith("<extra_id_0> ") and targets.endswith(f"<extra_id_{n}>")
    for k, fill in enumerate(fills):
        assert f"<extra_id_{k}> {fill} <extra_id_{k + 1}>" in inputs
    # Substitute: the text between <extra_id_k> and <extra_id_k+1> in the targets replaces
    # the bracketed fill k in the inputs.
    target_pieces = re.split(r" ?<extra_id_\d+> ?", targets)[1:-1]
    restored = inputs
    for k, original in enumerate(target_pieces):
        restored = re.sub(
            rf"<extra_id_{k}> .*? <extra_id_{k + 1}>", lambda _, o=original: o, restored, count=1
        )
    assert restored == text
