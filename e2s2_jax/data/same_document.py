"""The same-document task's data: documents with their paragraph boundaries, pairs of text spans
labelled same paragraph / same document / different document, and the SeqIO source and
preprocessors that turn a pair into `inputs` (span, eos, span), a text target naming the label
and per-position `pair_labels` (view_labels: 0, 1, 2, or NO_PAIR for rows without a pair).

A document is a list of paragraphs (str). The bundled corpus's documents are its chapters
(data/corpus/*.chapters.tsv); a user's files hold one document per file or per blank-line block,
one paragraph per line.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import seqio
import tensorflow as tf

from e2s2_jax.data import view_labels
from e2s2_jax.data.span_corruption import vocabulary_of
from e2s2_jax.data.text_source import (
    FilePatterns,
    _open_binary,
    check_not_empty,
    expand_file_patterns,
    read_text_documents,
)
from e2s2_jax.errors import ConfigError

Document = list[str]
DocumentUnit = Literal["file", "block"]
DOCUMENT_UNITS = ("file", "block")


# ---------------------------------------------------------------------------------------------
# Documents.
# ---------------------------------------------------------------------------------------------
def read_chapters(text_file: str, chapters_file: str) -> list[Document]:
    """The chapters of a bundled split: the text file's lines (paragraphs) grouped by the
    chapters file's `paragraphs` column. Raises ConfigError when the two disagree in length."""
    paragraphs = list(read_text_documents(text_file))
    with tf.io.gfile.GFile(chapters_file) as f:
        counts = [int(row["paragraphs"]) for row in csv.DictReader(f, delimiter="\t")]
    if sum(counts) != len(paragraphs):
        raise ConfigError(
            f"{chapters_file} counts {sum(counts)} paragraphs but {text_file} has "
            f"{len(paragraphs)}: rebuild both with `python scripts/build_corpus.py`."
        )
    bounds = np.cumsum([0, *counts])
    return [paragraphs[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def read_document_files(file_patterns: FilePatterns, unit: DocumentUnit = "file") -> list[Document]:
    """The documents of text files (plain or .gz), one paragraph per non-blank line: one
    document per file (`unit='file'`) or per block of lines between blank lines ('block')."""
    if unit not in DOCUMENT_UNITS:
        raise ConfigError(f"document unit {unit!r}: use one of {DOCUMENT_UNITS}.")
    documents: list[Document] = []
    for path in expand_file_patterns(file_patterns):
        check_not_empty(path)
        if unit == "file":
            documents.append(list(read_text_documents(path)))
            continue
        block: Document = []
        with _open_binary(path) as f:
            for raw_line in [*f, b""]:
                line = raw_line.decode("utf-8", errors="replace").strip()
                if line:
                    block.append(line)
                elif block:
                    documents.append(block)
                    block = []
    return documents


# ---------------------------------------------------------------------------------------------
# Pairs.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpanPair:
    """Two spans and their label; each span's place is `(document, paragraph, first word,
    words)` in the documents it was drawn from."""

    first: str
    second: str
    label: int
    first_place: tuple[int, int, int, int]
    second_place: tuple[int, int, int, int]


class SpanPairSampler:
    """Draws span pairs from `documents`, the label uniform over the three classes.

    Only paragraphs of at least 2 * `min_span_words` words are used, for every class, and a
    span drawn from a paragraph of n words has min(`span_words`, n // 2) consecutive words, so
    span lengths come from the same distribution whatever the label (no length cue):
    - same paragraph: two non-overlapping spans of one paragraph (uniform over the eligible);
    - same document: spans of two paragraphs of one document (the first uniform over the
      eligible paragraphs of documents that have two, the second uniform over the others);
    - different document: the first paragraph uniform, the second uniform over the eligible
      paragraphs of the other documents.
    The two spans come in random order. Raises ConfigError when a class cannot be drawn
    (fewer than two documents, or no document with two paragraphs, long enough).
    """

    def __init__(self, documents: Sequence[Document], span_words: int, min_span_words: int):
        if not 1 <= min_span_words <= span_words:
            raise ConfigError(
                f"min_span_words={min_span_words}, span_words={span_words}: need "
                "1 <= min_span_words <= span_words."
            )
        self.span_words = span_words
        self.words: list[list[str]] = []
        self.places: list[tuple[int, int]] = []  # (document, paragraph) of each eligible one
        for d, document in enumerate(documents):
            for p, paragraph in enumerate(document):
                words = paragraph.split()
                if len(words) >= 2 * min_span_words:
                    self.words.append(words)
                    self.places.append((d, p))
        owners = np.array([d for d, _ in self.places], np.int64)
        self.owners = owners
        documents_used, counts = np.unique(owners, return_counts=True)
        # Eligible paragraphs by document: [start, end) into the (document-ordered) lists.
        self.ranges = {
            int(d): (int(np.searchsorted(owners, d)), int(np.searchsorted(owners, d, "right")))
            for d in documents_used
        }
        self.multi = np.flatnonzero(np.isin(owners, documents_used[counts >= 2]))
        if len(documents_used) < 2:
            raise ConfigError(
                f"the same-document task found {len(documents_used)} document(s) with a "
                f"paragraph of at least {2 * min_span_words} words (of {len(documents)} "
                "documents): it needs two or more to draw different-document pairs. Give more "
                "documents (one per file, or blank lines between them with unit 'block') or "
                "lower min_span_words."
            )
        if len(self.multi) == 0:
            raise ConfigError(
                f"no document has two paragraphs of at least {2 * min_span_words} words: the "
                "same-document task needs one to draw same-document pairs. Put paragraphs on "
                "their own lines, or lower min_span_words."
            )

    def _span(self, index: int, rng: np.random.Generator, first_word: int | None = None):
        words = self.words[index]
        length = min(self.span_words, len(words) // 2)
        if first_word is None:
            first_word = int(rng.integers(0, len(words) - length + 1))
        d, p = self.places[index]
        text = " ".join(words[first_word : first_word + length])
        return text, (d, p, first_word, length)

    def draw(self, rng: np.random.Generator) -> SpanPair:
        """One pair, its label and spans drawn from `rng`."""
        label = int(rng.integers(view_labels.NUM_PAIR_CLASSES))
        total = len(self.places)
        if label == view_labels.SAME_PARAGRAPH:
            index = int(rng.integers(total))
            n = len(self.words[index])
            length = min(self.span_words, n // 2)
            first = int(rng.integers(0, n - 2 * length + 1))
            second = int(rng.integers(first + length, n - length + 1))
            spans = [self._span(index, rng, first), self._span(index, rng, second)]
        elif label == view_labels.SAME_DOCUMENT:
            index = int(self.multi[rng.integers(len(self.multi))])
            start, end = self.ranges[int(self.owners[index])]
            other = start + int(rng.integers(end - start - 1))
            other += other >= index  # any other eligible paragraph of the document
            spans = [self._span(index, rng), self._span(other, rng)]
        else:
            index = int(rng.integers(total))
            start, end = self.ranges[int(self.owners[index])]
            other = int(rng.integers(total - (end - start)))
            other += (end - start) * (other >= start)  # skip the first one's document
            spans = [self._span(index, rng), self._span(other, rng)]
        if rng.random() < 0.5:
            spans.reverse()
        (first_text, first_place), (second_text, second_place) = spans
        return SpanPair(first_text, second_text, label, first_place, second_place)

    def sample(self, num_pairs: int, seed: int) -> list[SpanPair]:
        """`num_pairs` pairs, the same for the same seed."""
        rng = np.random.default_rng(seed)
        return [self.draw(rng) for _ in range(num_pairs)]


# ---------------------------------------------------------------------------------------------
# SeqIO.
# ---------------------------------------------------------------------------------------------
class SpanPairsDataSource(seqio.FunctionDataSource):
    """{first, second: tf.string, label: int32} examples: `pairs_per_epoch[split]` pairs drawn
    from each split's documents with the split's seed (`seed` + the split's index), the same
    pairs every epoch. Documents are read and checked when the source is made (ConfigError);
    a process reads its shard of the pairs (every num_shards-th one)."""

    def __init__(
        self,
        split_documents: Mapping[str, Sequence[Document]],
        *,
        pairs_per_epoch: Mapping[str, int] | None = None,
        span_words: int = 32,
        min_span_words: int = 8,
        seed: int = 0,
    ):
        self.samplers = {
            split: SpanPairSampler(documents, span_words, min_span_words)
            for split, documents in split_documents.items()
        }
        counts = {split: len(s.places) for split, s in self.samplers.items()}
        counts.update(pairs_per_epoch or {})
        self.pairs_per_epoch = counts
        self.seed = seed

        def dataset_fn(split: str, shuffle_files: bool) -> tf.data.Dataset:
            del shuffle_files  # the task's shuffle buffer shuffles the pairs
            split_seed = seed + sorted(self.samplers).index(split)
            pairs = self.samplers[split].sample(self.pairs_per_epoch[split], split_seed)
            return tf.data.Dataset.from_tensor_slices(
                {
                    "first": [pair.first for pair in pairs],
                    "second": [pair.second for pair in pairs],
                    "label": np.array([pair.label for pair in pairs], np.int32),
                }
            )

        super().__init__(dataset_fn, splits=list(split_documents), num_input_examples=counts)

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
        dataset = super().get_dataset(split, shuffle, None)
        if shard_info and shard_info.num_shards > 1:
            dataset = dataset.shard(shard_info.num_shards, shard_info.index)
        return dataset

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True


# One label per input position; no eos of its own (`with_pair_labels` runs after the eos).
PAIR_LABELS_FEATURE = seqio.Feature(
    vocabulary=seqio.PassThroughVocabulary(size=view_labels.NO_PAIR + 1),
    add_eos=False,
    required=False,
)


def pair_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """inputs / targets (text, eos appended) and the per-position `pair_labels`."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "pair_labels": PAIR_LABELS_FEATURE,
    }


def join_span_pair(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None = None,
    output_features: Mapping[str, seqio.Feature] | None = None,
) -> tf.data.Dataset:
    """SeqIO preprocessor: {first, second, label} -> `inputs` = first span, eos, second span
    (each cut to half of the inputs' room, so that both fit beside the two eos), `targets` =
    the label's name (view_labels.PAIR_LABEL_NAMES) and `label`. Run `with_pair_labels` after
    the eos is appended."""
    vocabulary = vocabulary_of(output_features, "inputs")
    target_vocabulary = vocabulary_of(output_features, "targets")
    room = None
    if sequence_length and sequence_length.get("inputs"):
        room = max((sequence_length["inputs"] - 2) // 2, 1)
    names = tf.constant(view_labels.PAIR_LABEL_NAMES)
    eos = tf.constant([vocabulary.eos_id], tf.int32)

    def join(features):
        spans = [tf.cast(vocabulary.encode_tf(features[k]), tf.int32) for k in ("first", "second")]
        if room is not None:
            spans = [span[:room] for span in spans]
        targets = tf.cast(
            target_vocabulary.encode_tf(tf.gather(names, features["label"])), tf.int32
        )
        return {
            "inputs": tf.concat([spans[0], eos, spans[1]], axis=0),
            "targets": targets,
            "label": features["label"],
        }

    return dataset.map(join, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset
def with_pair_labels(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """`pair_labels`: the example's `label` at each position of its `inputs`; `label` dropped."""
    features = dict(features)
    label = tf.cast(features.pop("label"), tf.int32)
    return {**features, "pair_labels": tf.fill(tf.shape(features["inputs"]), label)}


@seqio.map_over_dataset
def without_pair(features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """`pair_labels` = NO_PAIR at each input position: an example (span corruption) that mixes
    with same-document pairs and adds no same-document term."""
    no_pair = tf.fill(tf.shape(features["inputs"]), view_labels.NO_PAIR)
    return {**features, "pair_labels": no_pair}


def span_pair_preprocessors() -> list:
    """The same-document task's preprocessors: join the pair, append eos, spread the label."""
    return [join_span_pair, seqio.preprocessors.append_eos_after_trim, with_pair_labels]
