"""Shared by the preprocessor tests: a small SentencePiece vocabulary trained on bundled text,
token datasets, and a NumPy reference that undoes span corruption."""

import functools
import gzip

import numpy as np
import sentencepiece as spm
import seqio
import tensorflow as tf

from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES

NUM_EXTRA_IDS = 100
PIECES = 1000


@functools.cache
def bundled_lines() -> tuple[str, ...]:
    """The non-blank lines among the first 6000 of the first bundled training file."""
    with gzip.open(BUNDLED_TRAIN_FILES[0], "rt", encoding="utf-8") as f:
        lines = [line.strip() for _, line in zip(range(6000), f, strict=False)]
    return tuple(line for line in lines if line)


def small_vocabulary(tmp_path_factory) -> seqio.SentencePieceVocabulary:
    """A small SentencePiece model with T5's conventions, trained on bundled text once per test
    session (in pytest's session directory, which the preprocessor test files share)."""
    prefix = tmp_path_factory.getbasetemp() / "small_spm" / "small"
    if not prefix.with_suffix(".model").exists():
        prefix.parent.mkdir(exist_ok=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(bundled_lines()),
            model_prefix=str(prefix),
            vocab_size=PIECES,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=2,
            minloglevel=2,
        )
    return seqio.SentencePieceVocabulary(str(prefix) + ".model", extra_ids=NUM_EXTRA_IDS)


def encoded_corpus(vocabulary) -> np.ndarray:
    """The bundled lines' tokens, concatenated: int32 [tokens]."""
    return np.concatenate([vocabulary.encode(line) for line in bundled_lines()]).astype(np.int32)


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
