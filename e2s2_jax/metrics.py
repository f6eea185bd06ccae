"""SeqIO metric functions on decoded text: `fn(targets, predictions) -> {name: value}`."""

from __future__ import annotations

from collections.abc import Sequence


def _check(targets: Sequence[str], predictions: Sequence[str]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target (after stripping outer whitespace)."""
    _check(targets, predictions)
    hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions, strict=True))
    return {"exact_match": 100.0 * hits / max(len(targets), 1)}


def word_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of target words matched at the same position (missing words count wrong)."""
    _check(targets, predictions)
    correct = total = 0
    for target, prediction in zip(targets, predictions, strict=True):
        target_words, predicted_words = target.split(), prediction.split()
        total += len(target_words)
        correct += sum(t == p for t, p in zip(target_words, predicted_words, strict=False))
    return {"word_accuracy": 100.0 * correct / max(total, 1)}
