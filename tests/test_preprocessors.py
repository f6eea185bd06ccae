"""Tests of the preprocessor chain's document splitting, its sentinel check, and the reader of
SSR records."""

import numpy as np
import pytest
import seqio
import tensorflow as tf
from preprocessor_helpers import token_dataset

from e2s2_jax.data import preprocessors, span_corruption


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


def test_too_few_extra_ids_is_a_clear_error(vocabulary):
    small = seqio.SentencePieceVocabulary(vocabulary.sentencepiece_model_file, extra_ids=10)
    features = preprocessors.pretraining_output_features(small)
    with pytest.raises(ValueError, match="needs up to 28 sentinels but the vocabulary has 10"):
        preprocessors.split_documents(
            token_dataset([[5, 6, 7]]), {"inputs": 512, "targets": 114}, features
        )
    without = seqio.SentencePieceVocabulary(vocabulary.sentencepiece_model_file, extra_ids=0)
    with pytest.raises(ValueError, match="extra ids"):
        span_corruption.span_corruption(
            token_dataset([[5, 6, 7]]), preprocessors.pretraining_output_features(without)
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
