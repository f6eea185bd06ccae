"""The same-document task's data: the pair sampler against a pure-Python check of every pair
(labels balanced within binomial error, each label true of its spans, span lengths and texts),
documents from the bundled chapters and from a user's files, the task's examples and their
packing, and too few documents stopping with a one-line message (exit 2).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from e2s2_jax.data import same_document, view_labels
from e2s2_jax.data.corpus import (
    BUNDLED_TRAIN_CHAPTERS,
    BUNDLED_TRAIN_FILES,
)
from e2s2_jax.errors import ConfigError

NUM_PAIRS = 30_000
SPAN_WORDS, MIN_SPAN_WORDS = 32, 8


@pytest.fixture(scope="module")
def chapters() -> list[list[str]]:
    return same_document.read_chapters(BUNDLED_TRAIN_FILES[0], BUNDLED_TRAIN_CHAPTERS)


def check_pair(documents, pair: same_document.SpanPair) -> None:
    """Asserts what the pair's label claims, from the documents themselves."""
    spans = []
    for text, (d, p, start, length) in (
        (pair.first, pair.first_place),
        (pair.second, pair.second_place),
    ):
        words = documents[d][p].split()
        assert len(words) >= 2 * MIN_SPAN_WORDS  # only long enough paragraphs, for every label
        assert length == min(SPAN_WORDS, len(words) // 2)
        assert 0 <= start and start + length <= len(words)
        assert text == " ".join(words[start : start + length])
        spans.append((d, p, start, length))
    (d1, p1, s1, n1), (d2, p2, s2, n2) = spans
    if pair.label == view_labels.SAME_PARAGRAPH:
        assert (d1, p1) == (d2, p2)
        assert s1 + n1 <= s2 or s2 + n2 <= s1  # the two spans do not overlap
    elif pair.label == view_labels.SAME_DOCUMENT:
        assert d1 == d2 and p1 != p2
    else:
        assert pair.label == view_labels.DIFFERENT_DOCUMENT and d1 != d2


def test_pairs_are_balanced_and_true_to_their_labels(chapters):
    sampler = same_document.SpanPairSampler(chapters, SPAN_WORDS, MIN_SPAN_WORDS)
    pairs = sampler.sample(NUM_PAIRS, seed=3)
    for pair in pairs:
        check_pair(chapters, pair)
    # Each label with probability 1/3: within 4 binomial standard deviations.
    counts = Counter(pair.label for pair in pairs)
    tolerance = 4 * math.sqrt(NUM_PAIRS * (1 / 3) * (2 / 3))
    for label in range(3):
        assert abs(counts[label] - NUM_PAIRS / 3) < tolerance, counts
    # The spans' order is random: the first span is the earlier one about half of the time.
    earlier = sum(pair.first_place[:3] < pair.second_place[:3] for pair in pairs)
    assert abs(earlier - NUM_PAIRS / 2) < 4 * math.sqrt(NUM_PAIRS / 4)
    # Span lengths do not give the label away: the same mean length for each label (4 std).
    lengths = {label: [] for label in range(3)}
    for pair in pairs:
        lengths[pair.label] += [pair.first_place[3], pair.second_place[3]]
    means = [np.mean(lengths[label]) for label in range(3)]
    spread = max(np.std(lengths[label]) / math.sqrt(len(lengths[label])) for label in range(3))
    assert max(means) - min(means) < 6 * spread, means
    # Deterministic from the seed.
    assert sampler.sample(50, seed=3) == pairs[:50]
    assert sampler.sample(50, seed=4) != pairs[:50]


def test_bundled_chapters_and_document_files(chapters, tmp_path):
    # 258 chapters whose paragraphs are exactly the lines of the train file, in order.
    assert len(chapters) == 258
    lines = list(same_document.read_text_documents(BUNDLED_TRAIN_FILES))
    assert [p for chapter in chapters for p in chapter] == lines
    # A user's files: one document per file, or per blank-line block.
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    (tmp_path / "b.txt").write_text("\nfour\n\n\nfive\nsix\n")
    by_file = same_document.read_document_files(str(tmp_path / "*.txt"), "file")
    assert by_file == [["one", "two", "three"], ["four", "five", "six"]]
    by_block = same_document.read_document_files(str(tmp_path / "*.txt"), "block")
    assert by_block == [["one", "two"], ["three"], ["four"], ["five", "six"]]


@pytest.mark.parametrize(
    "documents, expected",
    [
        ([["a b c d e f g h i j k l m n o p q r"] * 3], "found 1 document(s)"),
        ([["short"], ["also short"]], "found 0 document(s)"),
        ([["w " * 20], ["v " * 20]], "no document has two paragraphs"),
    ],
)
def test_too_few_documents_raise_config_error(documents, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        same_document.SpanPairSampler(documents, SPAN_WORDS, MIN_SPAN_WORDS)


def test_task_examples_and_packed_pair_labels():
    import seqio

    import tasks  # noqa: F401
    from e2s2_jax.data.feature_converters import E2S2EncDecFeatureConverter
    from tasks.same_document import same_document_task

    name = same_document_task(mix_with_span_corruption=True)
    assert name == "bundled_same_document_and_span_corruption"
    lengths = {"inputs": 64, "targets": 16}
    task = seqio.get_mixture_or_task("bundled_same_document")
    vocabulary = task.output_features["inputs"].vocabulary
    examples = list(
        task.get_dataset(lengths, split="validation", shuffle=False).take(60).as_numpy_iterator()
    )
    for example in examples:
        inputs, labels = example["inputs"], example["pair_labels"]
        # span eos span eos, the label at every position, its name as the target.
        assert np.count_nonzero(inputs == 1) == 2 and inputs[-1] == 1 and len(inputs) <= 64
        assert labels.shape == inputs.shape and len(set(labels)) == 1
        name_of_label = view_labels.PAIR_LABEL_NAMES[labels[0]]
        assert vocabulary.decode(example["targets"].tolist()) == name_of_label
    # Packed with span corruption (NO_PAIR): each segment keeps its own label.
    converter = E2S2EncDecFeatureConverter(pack=True, with_pair_labels=True)
    dataset = seqio.get_dataset(
        name, lengths, dataset_split="validation", shuffle=False, feature_converter=converter
    )
    seen = Counter()
    for row in dataset.take(40).as_numpy_iterator():
        segments, pair_labels = row["encoder_segment_ids"], row["encoder_pair_labels"]
        assert np.all(pair_labels[segments == 0] == view_labels.NO_PAIR)
        for segment in set(segments[segments > 0]):
            labels = set(pair_labels[segments == segment])
            assert len(labels) == 1
            seen[labels.pop()] += 1
    assert set(seen) == {0, 1, 2, view_labels.NO_PAIR}, seen


def test_one_document_stops_the_run_before_training(tmp_path, capsys):
    from test_encoder_training import stops_before_training

    (tmp_path / "one.txt").write_text(("word " * 40 + "\n") * 5)
    extra = [
        "--gin_file=gin/objectives/same_document.gin",
        f'--gin.same_document_task.files="{tmp_path / "*.txt"}"',
    ]
    stderr = stops_before_training(tmp_path, capsys, extra)
    assert "found 1 document(s)" in stderr and "needs two or more" in stderr, stderr
