"""Tests of the objectives' preprocessors against NumPy references and statistical bounds."""

import gzip
import math

import numpy as np
import pytest
import sentencepiece as spm
import seqio
import tensorflow as tf

from e2s2_jax.data import preprocessors
from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES

NUM_EXTRA_IDS = 100
PIECES = 1000


@pytest.fixture(scope="module")
def corpus_lines():
    with gzip.open(BUNDLED_TRAIN_FILES[0], "rt", encoding="utf-8") as f:
        lines = [line.strip() for _, line in zip(range(6000), f, strict=False)]
    return [line for line in lines if line]


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory, corpus_lines):
    """A small SentencePiece model with T5's conventions, trained here on bundled text."""
    prefix = str(tmp_path_factory.mktemp("spm") / "small")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines),
        model_prefix=prefix,
        vocab_size=PIECES,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    return seqio.SentencePieceVocabulary(prefix + ".model", extra_ids=NUM_EXTRA_IDS)


@pytest.fixture(scope="module")
def corpus_tokens(vocabulary, corpus_lines):
    return np.concatenate([vocabulary.encode(line) for line in corpus_lines]).astype(np.int32)


def token_dataset(documents):
    return tf.data.Dataset.from_generator(
        lambda: ({"targets": np.asarray(doc, np.int32)} for doc in documents),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )


def run(preprocess, documents, output_features, seed=0):
    with seqio.utils.map_seed_manager(seed):
        dataset = preprocess(token_dataset(documents), output_features)
    return list(dataset.as_numpy_iterator())


def is_sentinel(tokens, vocabulary):
    return np.asarray(tokens) >= vocabulary.vocab_size - vocabulary.extra_ids


def uncorrupt(inputs, targets, vocabulary):
    """NumPy reference: puts each target span back in place of its sentinel."""
    spans, current = {}, None
    for token in targets:
        if is_sentinel(token, vocabulary):
            current = int(token)
            spans[current] = []
        else:
            assert current is not None, "targets must start with a sentinel"
            spans[current].append(int(token))
    restored = []
    for token in inputs:
        restored.extend(spans.pop(int(token)) if is_sentinel(token, vocabulary) else [int(token)])
    assert not spans, "every target span has a sentinel in the inputs"
    return np.asarray(restored, np.int32)


def test_lengths_match_t5_recipe():
    assert preprocessors.max_document_tokens(512, 114) == 568
    assert preprocessors.corrupted_lengths(568) == (512, 114)
    # Full reconstruction needs room for the whole text plus eos in the targets.
    assert preprocessors.max_document_tokens(512, 512, target_mode="full_reconstruction") == 511


def test_span_corruption_round_trips_text(vocabulary, corpus_lines):
    documents = [vocabulary.encode(line) for line in corpus_lines[:300]]
    documents = [doc for doc in documents if len(doc) >= 2]
    features = preprocessors.pretraining_output_features(vocabulary)
    outputs = run(preprocessors.span_corruption, documents, features, seed=3)
    assert len(outputs) == len(documents)
    for doc, example in zip(documents, outputs, strict=True):
        restored = uncorrupt(example["inputs"], example["targets"], vocabulary)
        np.testing.assert_array_equal(restored, doc)
        sentinels = example["inputs"][is_sentinel(example["inputs"], vocabulary)]
        # Sentinels count down from <extra_id_0> = vocab_size - 1.
        expected = vocabulary.vocab_size - 1 - np.arange(len(sentinels))
        np.testing.assert_array_equal(sentinels, expected)
        assert vocabulary.decode(restored.tolist()) == vocabulary.decode(list(doc))


def test_split_documents_keeps_every_token(vocabulary, corpus_tokens):
    documents = [corpus_tokens[:2000], corpus_tokens[2000:2001], corpus_tokens[:0]]
    features = preprocessors.pretraining_output_features(vocabulary)
    dataset = preprocessors.split_documents(
        token_dataset(documents), {"inputs": 512, "targets": 114}, features
    )
    pieces = [ex["targets"] for ex in dataset.as_numpy_iterator()]
    assert [len(p) for p in pieces] == [500, 500, 500, 500, 1]  # near-equal, nothing dropped
    np.testing.assert_array_equal(np.concatenate(pieces), corpus_tokens[:2001])


def test_split_documents_concatenates_groups_into_full_pieces(vocabulary, corpus_tokens):
    lengths = [300, 100, 500, 7, 400, 250]
    bounds = np.cumsum([0] + lengths)
    documents = [corpus_tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    features = preprocessors.pretraining_output_features(vocabulary)
    dataset = preprocessors.split_documents(
        token_dataset(documents), {"inputs": 512, "targets": 114}, features, documents_per_group=4
    )
    pieces = [ex["targets"] for ex in dataset.as_numpy_iterator()]
    # Group 1: 907 tokens -> 568 + 339; group 2: 650 tokens -> 568 + 82.
    assert [len(p) for p in pieces] == [568, 339, 568, 82]
    np.testing.assert_array_equal(np.concatenate(pieces), corpus_tokens[: bounds[-1]])


def test_span_corruption_statistics(vocabulary):
    """Over 10k examples: density and mean span length within 2%; span lengths follow the
    uniform-composition law of T5's segmentation; spans alternate starting with non-noise."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 569, size=10_000)
    documents = [rng.integers(3, PIECES, size=n) for n in lengths]
    features = preprocessors.pretraining_output_features(vocabulary)
    outputs = run(preprocessors.span_corruption, documents, features, seed=1)

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
    features = preprocessors.pretraining_output_features(vocabulary)
    outputs = run(preprocessors.span_corruption, documents, features, seed=2)
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
    features = preprocessors.pretraining_output_features(vocabulary)
    outputs = run(preprocessors.full_reconstruction, documents, features, seed=4)
    for doc, example in zip(documents, outputs, strict=True):
        np.testing.assert_array_equal(example["targets"], doc)
        num_noise, num_spans = preprocessors.noise_token_and_span_counts(len(doc))
        assert is_sentinel(example["inputs"], vocabulary).sum() == num_spans
        assert len(example["inputs"]) == len(doc) - num_noise + num_spans


def e2s2_examples(vocabulary, corpus_tokens, num_examples=300, seed=0, **options):
    pieces = [corpus_tokens[i * 568 : (i + 1) * 568] for i in range(num_examples)]
    features = preprocessors.pretraining_output_features(vocabulary, with_noised_view=True)

    def preprocess(dataset, output_features):
        dataset = preprocessors.e2s2_views(dataset, output_features, **options)
        return seqio.preprocessors.append_eos_after_trim(dataset, output_features)

    return pieces, run(preprocess, pieces, features, seed=seed)


def test_e2s2_views_noise_fractions_and_labels(vocabulary, corpus_tokens):
    pieces, outputs = e2s2_examples(vocabulary, corpus_tokens)
    shuffled = replaced = positions = 0
    for piece, example in zip(pieces, outputs, strict=True):
        view_m, view_n = example["inputs"], example["inputs_noised"]
        labels = example["noise_labels"]
        assert len(view_m) == len(view_n) == len(labels) == 512  # eos included
        np.testing.assert_array_equal(
            uncorrupt(view_m[:-1], example["targets"][:-1], vocabulary), piece
        )
        changed = view_m != view_n
        # Labels agree with a token-by-token diff of the two views.
        np.testing.assert_array_equal(changed, labels > 0)
        # A shuffled token comes from its own trigram: within two positions in view M.
        for i in np.flatnonzero(labels == 1):
            assert view_n[i] in view_m[max(i - 2, 0) : i + 3]
        # Special tokens (sentinels, eos, unk, pad) stay where they are and are never written.
        special = is_sentinel(view_m, vocabulary) | np.isin(view_m, [0, 1, 2])
        np.testing.assert_array_equal(view_n[special], view_m[special])
        assert not np.isin(view_n[~special], [0, 1, 2]).any()
        assert not is_sentinel(view_n[~special], vocabulary).any()
        assert labels[-1] == 0 and view_n[-1] == 1
        shuffled += int((labels == 1).sum())
        replaced += int((labels == 2).sum())
        positions += len(labels)
    assert 0.05 <= shuffled / positions <= 0.10, shuffled / positions
    assert 0.12 <= replaced / positions <= 0.16, replaced / positions


def test_e2s2_views_ratios_are_configurable(vocabulary, corpus_tokens):
    _, outputs = e2s2_examples(
        vocabulary,
        corpus_tokens,
        num_examples=50,
        replace_ratio=0.0,
        shuffle_anchor_ratio=0.0,
        max_shuffle_anchors=0,
    )
    for example in outputs:
        np.testing.assert_array_equal(example["inputs"], example["inputs_noised"])
        assert not example["noise_labels"].any()
    _, outputs = e2s2_examples(vocabulary, corpus_tokens, num_examples=50, replace_ratio=0.3)
    replaced = np.mean(np.concatenate([ex["noise_labels"] for ex in outputs]) == 2)
    assert 0.24 < replaced < 0.30


def test_same_seed_same_bytes_other_seed_differs(vocabulary, corpus_tokens):
    _, first = e2s2_examples(vocabulary, corpus_tokens, num_examples=20, seed=7)
    _, again = e2s2_examples(vocabulary, corpus_tokens, num_examples=20, seed=7)
    _, other = e2s2_examples(vocabulary, corpus_tokens, num_examples=20, seed=8)
    for key in ("inputs", "inputs_noised", "noise_labels", "targets"):
        assert b"".join(ex[key].tobytes() for ex in first) == b"".join(
            ex[key].tobytes() for ex in again
        )
    assert any(
        not np.array_equal(a["inputs_noised"], b["inputs_noised"])
        for a, b in zip(first, other, strict=True)
    )


def test_too_few_extra_ids_is_a_clear_error(vocabulary):
    small = seqio.SentencePieceVocabulary(vocabulary.sentencepiece_model_file, extra_ids=10)
    features = preprocessors.pretraining_output_features(small)
    with pytest.raises(ValueError, match="needs up to 28 sentinels but the vocabulary has 10"):
        preprocessors.split_documents(
            token_dataset([[5, 6, 7]]), {"inputs": 512, "targets": 114}, features
        )
    without = seqio.SentencePieceVocabulary(vocabulary.sentencepiece_model_file, extra_ids=0)
    with pytest.raises(ValueError, match="extra ids"):
        preprocessors.span_corruption(
            token_dataset([[5, 6, 7]]), preprocessors.pretraining_output_features(without)
        )


def test_bad_target_mode_is_rejected(vocabulary):
    with pytest.raises(ValueError, match="target_mode"):
        preprocessors.span_corruption(
            token_dataset([[5, 6, 7]]),
            preprocessors.pretraining_output_features(vocabulary),
            target_mode="whole",
        )


def write_ssr_records(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for inputs, targets, fill_score in records:
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "inputs": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[inputs.encode()])
                        ),
                        "targets": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[targets.encode()])
                        ),
                        "fill_score": tf.train.Feature(
                            float_list=tf.train.FloatList(value=[fill_score])
                        ),
                    }
                )
            )
            writer.write(example.SerializeToString())


def test_ssr_source_reads_records(tmp_path):
    records = [
        (
            "It was <extra_id_0> a truth <extra_id_1> acknowledged.",
            "<extra_id_0> universally <extra_id_1>",
            -1.25,
        ),
        ("She <extra_id_0> walked <extra_id_1> home.", "<extra_id_0> slowly <extra_id_1>", -0.5),
    ]
    write_ssr_records(tmp_path / "ssr-00000-of-00001.tfrecord", records)
    source = preprocessors.ssr_task_source({"train": str(tmp_path / "ssr-*.tfrecord")})
    read = list(source.get_dataset("train", shuffle=False).as_numpy_iterator())
    assert [(r["inputs"].decode(), r["targets"].decode()) for r in read] == [
        (inputs, targets) for inputs, targets, _ in records
    ]
    np.testing.assert_allclose([r["fill_score"] for r in read], [-1.25, -0.5])
