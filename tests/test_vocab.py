"""Tests of the SentencePiece vocabulary: T5 ids, sentinels, round trip, cache, clear errors."""

import gzip
import os
import threading

import pytest
import sentencepiece as spm
import seqio
import tensorflow as tf

from e2s2_jax.data import vocab
from e2s2_jax.data.corpus import BUNDLED_VALIDATION_FILES, DEMO_VOCAB_SIZE
from e2s2_jax.data.text_source import read_text_documents

SMALL_VOCAB = 300


@pytest.fixture(scope="session")
def demo_vocabulary(tmp_path_factory):
    """The demo vocabulary, trained once per session into a private cache (a few seconds)."""
    cache_root = str(tmp_path_factory.mktemp("e2s2_cache"))
    previous = os.environ.get(vocab.CACHE_ENV_VAR)
    os.environ[vocab.CACHE_ENV_VAR] = cache_root
    try:
        vocabulary = vocab.get_vocabulary()
    finally:
        if previous is None:
            del os.environ[vocab.CACHE_ENV_VAR]
        else:
            os.environ[vocab.CACHE_ENV_VAR] = previous
    assert vocabulary.sentencepiece_model_file.startswith(os.path.join(cache_root, "vocab"))
    return vocabulary


@pytest.fixture(scope="session")
def validation_documents():
    return list(read_text_documents(BUNDLED_VALIDATION_FILES))


@pytest.fixture
def small_corpus(tmp_path, validation_documents):
    """200 real paragraphs in a .gz file: enough for a SMALL_VOCAB model in well under a second."""
    path = tmp_path / "small.txt.gz"
    path.write_bytes(gzip.compress("\n".join(validation_documents[:200]).encode()))
    return str(path)


def test_t5_special_ids_and_sizes(demo_vocabulary):
    tokenizer = demo_vocabulary.tokenizer
    assert (demo_vocabulary.pad_id, demo_vocabulary.eos_id, demo_vocabulary.unk_id) == (0, 1, 2)
    assert tokenizer.bos_id() == -1
    assert [tokenizer.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert demo_vocabulary.extra_ids == 100
    assert demo_vocabulary.vocab_size == DEMO_VOCAB_SIZE + 100


def test_sentinels_are_the_top_100_ids(demo_vocabulary):
    top = demo_vocabulary.vocab_size - 1
    for i in range(100):
        assert demo_vocabulary.encode(f"<extra_id_{i}>") == [top - i]
    # Ordinary text never produces a sentinel id.
    assert max(demo_vocabulary.encode("It is a truth universally acknowledged.")) < top - 99


def test_validation_text_round_trips_exactly(demo_vocabulary, validation_documents):
    # The corpus is whitespace-normalised and NFKC-stable, and character_coverage=1.0 covers all
    # its characters, so SentencePiece's decode(encode(x)) gives x back with no <unk>.
    for document in validation_documents:
        ids = demo_vocabulary.encode(document)
        assert 2 not in ids
        assert demo_vocabulary.decode(ids) == document
    # The TensorFlow tokenizer (used by SeqIO tasks) agrees with the Python one.
    sample = validation_documents[:20]
    tf_ids = demo_vocabulary.encode_tf(tf.constant(sample))
    assert [row.tolist() for row in tf_ids.numpy()] == [demo_vocabulary.encode(d) for d in sample]


def test_what_normalisation_changes(demo_vocabulary):
    # Guaranteed: whitespace runs collapse to one space and the ends are trimmed (NMT-NFKC).
    assert demo_vocabulary.decode(demo_vocabulary.encode("  Very   well,\tthen.  ")) == (
        "Very well, then."
    )
    # Characters the corpus never had come back as unk (no byte fallback in the demo model).
    assert 2 in demo_vocabulary.encode("a < b")


def test_cache_hit_returns_the_same_file_without_training(small_corpus, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    path = vocab.train_sentencepiece([small_corpus], SMALL_VOCAB, cache_dir=cache)
    mtime = os.stat(path).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("SentencePiece trained again on a cache hit")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    assert vocab.train_sentencepiece([small_corpus], SMALL_VOCAB, cache_dir=cache) == path
    assert os.stat(path).st_mtime_ns == mtime
    # The environment variable moves the default cache.
    monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(tmp_path))
    assert vocab.default_cache_dir() == str(tmp_path / "vocab")


def test_cache_key_follows_contents_and_options(small_corpus, tmp_path):
    cache = str(tmp_path / "cache")
    first = vocab.train_sentencepiece([small_corpus], SMALL_VOCAB, cache_dir=cache)
    other_size = vocab.train_sentencepiece([small_corpus], SMALL_VOCAB + 10, cache_dir=cache)
    with gzip.open(small_corpus, "at") as f:
        f.write("\nA new paragraph changes the corpus.\n")
    changed = vocab.train_sentencepiece([small_corpus], SMALL_VOCAB, cache_dir=cache)
    assert len({first, other_size, changed}) == 3
    assert sorted(p for p in os.listdir(cache) if p.endswith(".model")) == sorted(
        os.path.basename(p) for p in (first, other_size, changed)
    )


def test_training_is_byte_deterministic(small_corpus, tmp_path):
    paths = [
        vocab.train_sentencepiece([small_corpus], SMALL_VOCAB, cache_dir=str(tmp_path / name))
        for name in ("one", "two")
    ]
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read()


def test_concurrent_callers_train_once(small_corpus, tmp_path, monkeypatch):
    calls = []
    train = vocab._train
    monkeypatch.setattr(vocab, "_train", lambda *a: calls.append(1) or train(*a))
    cache = str(tmp_path / "cache")
    results = []
    workers = [
        threading.Thread(
            target=lambda: results.append(
                vocab.train_sentencepiece([small_corpus], SMALL_VOCAB, cache_dir=cache)
            )
        )
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(calls) == 1
    assert not [name for name in os.listdir(cache) if name.startswith(".tmp-")]


def test_too_large_vocab_size_names_file_and_limit(small_corpus, tmp_path):
    with pytest.raises(
        ValueError, match=r"vocab_size=50000 is too large .*small.txt.gz.*at most \d+"
    ):
        vocab.train_sentencepiece([small_corpus], 50000, cache_dir=str(tmp_path))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".model")]


def test_loading_by_path_and_its_errors(small_corpus, tmp_path):
    path = vocab.train_sentencepiece([small_corpus], SMALL_VOCAB, cache_dir=str(tmp_path))
    vocabulary = vocab.get_vocabulary(path, extra_ids=10)
    assert isinstance(vocabulary, seqio.SentencePieceVocabulary)
    assert vocabulary.vocab_size == SMALL_VOCAB + 10
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model does not exist"):
        vocab.get_vocabulary(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model is not a readable SentencePiece model"):
        vocab.get_vocabulary(str(garbage))
    # SentencePiece's own defaults (unk 0, bos 1, eos 2) are refused: we pad with 0.
    text_file = tmp_path / "plain.txt"
    with gzip.open(small_corpus, "rt") as f:
        text_file.write_text(f.read())
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(tmp_path / "default_ids"),
        vocab_size=SMALL_VOCAB,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="default_ids.model has pad_id=-1, eos_id=2"):
        vocab.get_vocabulary(str(tmp_path / "default_ids.model"))


def test_check_sentinels(small_corpus, tmp_path):
    path = vocab.train_sentencepiece([small_corpus], SMALL_VOCAB, cache_dir=str(tmp_path))
    vocabulary = vocab.get_vocabulary(path, extra_ids=10)
    vocab.check_sentinels(vocabulary, 10)
    with pytest.raises(ValueError, match=r"\.model has 10 extra ids but 26 sentinels.*>= 26"):
        vocab.check_sentinels(vocabulary, 26)
