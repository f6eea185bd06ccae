"""Text metrics against hand-computed values."""

import pytest

from e2s2_jax import metrics


def test_exact_match_and_word_accuracy():
    targets = ["The cat sat.", "A dog", "one two three"]
    predictions = [" The cat sat. ", "a dog", "one three"]
    assert metrics.exact_match(targets, predictions) == {"exact_match": pytest.approx(100 / 3)}
    # words: 3/3 + 1/2 + 1/3 (position-wise: "one" right, "three" vs "two" wrong, one missing)
    assert metrics.word_accuracy(targets, predictions) == {"word_accuracy": pytest.approx(62.5)}
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.exact_match(["a", "b"], ["a"])
