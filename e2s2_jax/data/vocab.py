"""SentencePiece vocabularies with T5's conventions: train (cached) on text files, or load by path.

Ids: pad 0, eos 1, unk 2, no bos; seqio appends the extra ids (sentinels) on top, <extra_id_0> last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence

import sentencepiece as spm
import seqio
import tensorflow as tf

from e2s2_jax.data.corpus import BUNDLED_TRAIN_FILES, DEMO_VOCAB_SIZE, check_bundled_corpus
from e2s2_jax.data.text_source import expand_file_patterns, read_text_documents

try:  # Unix: a lock file keeps concurrent processes from training the same model twice.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "E2S2_CACHE_DIR"
# Bump when the training recipe changes so old cache entries are not reused.
_RECIPE_VERSION = 1
# SentencePiece skips sentences longer than max_sentence_length (bytes), so documents are cut at
# whitespace into pieces of at most this many characters (4 bytes a character at most in UTF-8).
_MAX_PIECE_CHARS = 2000
_MAX_SENTENCE_BYTES = 4 * _MAX_PIECE_CHARS
# Unigram EM sums counts per thread, so the model depends on the thread count: fixing it (not the
# machine's core count) makes the same inputs give the same bytes on any machine we measured.
_NUM_THREADS = 4
_RANDOM_SEED = 0
_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def default_cache_dir() -> str:
    """Returns $E2S2_CACHE_DIR/vocab when set, else ~/.cache/e2s2_jax/vocab."""
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return os.path.join(root, "vocab")
    return os.path.join(os.path.expanduser("~"), ".cache", "e2s2_jax", "vocab")


def _hash_file(path: str, digest) -> None:
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)


def _training_options(
    vocab_size: int,
    max_sentences: int | None,
    character_coverage: float,
    byte_fallback: bool,
) -> dict:
    return dict(
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        input_sentence_size=max_sentences or 0,
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=_NUM_THREADS,
    )


def _sentences(files: Sequence[str]) -> Iterator[str]:
    yield from read_text_documents(files, max_chars_per_document=_MAX_PIECE_CHARS)


@contextlib.contextmanager
def _locked(lock_path: str):
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def train_sentencepiece(
    text_files: Sequence[str],
    vocab_size: int,
    *,
    cache_dir: str | None = None,
    max_sentences: int | None = 1_000_000,
    character_coverage: float = 1.0,
    byte_fallback: bool = False,
) -> str:
    """Returns the path of a unigram SentencePiece .model trained on `text_files`, cached.

    `text_files` are files or glob patterns of one document per line (.gz read transparently;
    lines that are not UTF-8 are skipped). `max_sentences` caps the sentences sampled for training
    (None: all). The cache key hashes the files' contents and every training option, so a changed
    corpus or option trains a new model; the model is written atomically (temp file + rename).
    """
    if vocab_size <= 3:
        raise ValueError(f"vocab_size={vocab_size}: need more than pad, eos and unk (3 ids)")
    files = expand_file_patterns(text_files)
    options = _training_options(vocab_size, max_sentences, character_coverage, byte_fallback)

    digest = hashlib.sha256()
    recipe = {
        "recipe": _RECIPE_VERSION,
        "sentencepiece": spm.__version__,
        "seed": _RANDOM_SEED,
        "max_piece_chars": _MAX_PIECE_CHARS,
        "options": options,
        # Contents and sizes, not paths: checkouts in different folders share the cache.
        "file_sizes": [tf.io.gfile.stat(f).length for f in files],
    }
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for path in files:
        _hash_file(path, digest)
    key = digest.hexdigest()[:20]

    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    model_path = os.path.join(cache_dir, f"spm_unigram_{vocab_size}_{key}.model")
    if os.path.isfile(model_path):
        return model_path

    with _locked(model_path + ".lock"):
        if os.path.isfile(model_path):  # another process trained it while we waited
            return model_path
        log.info("Training a %d-piece SentencePiece model on %s", vocab_size, files)
        start = time.perf_counter()
        model = _train(files, options)
        seconds = time.perf_counter() - start
        _write_atomically(model_path, model)
        recipe["files"] = files
        recipe["training_seconds"] = round(seconds, 2)
        _write_atomically(model_path[: -len(".model")] + ".json", json.dumps(recipe, indent=1))
        log.info("Trained %s in %.1f s", model_path, seconds)
    return model_path


def _train(files: list[str], options: dict) -> bytes:
    """Returns the serialized model; a vocab_size the corpus cannot support raises ValueError."""
    model = _BytesSink()
    spm.set_random_generator_seed(_RANDOM_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(files), model_writer=model, minloglevel=2, **options
        )
    except RuntimeError as error:
        match = _TOO_LARGE.search(str(error))
        if not match:
            raise
        limit = int(match.group(2))
        raise ValueError(
            f"vocab_size={options['vocab_size']} is too large for the corpus {files}: "
            f"SentencePiece allows at most {limit} pieces here. Pass vocab_size <= {limit} "
            "or train on more text."
        ) from error
    return model.getvalue()


class _BytesSink:
    """The `model_writer` SentencePiece calls with the serialized model."""

    def __init__(self):
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._chunks.append(data)

    def getvalue(self) -> bytes:
        return b"".join(self._chunks)


def _write_atomically(path: str, content: bytes | str) -> None:
    data = content.encode() if isinstance(content, str) else content
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_path, 0o644)  # mkstemp makes it private; the cache is shared like any file
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def get_vocabulary(
    spm_path: str | None = None, *, extra_ids: int = 100
) -> seqio.SentencePieceVocabulary:
    """Returns a seqio vocabulary with `extra_ids` sentinels on top of a SentencePiece model.

    With no path: the demo vocabulary (DEMO_VOCAB_SIZE pieces) trained on the bundled train split
    and cached. With a path (local or gs://, e.g. T5's cc_all.32000 spiece.model): that model.
    """
    if spm_path is None:
        check_bundled_corpus()
        spm_path = train_sentencepiece(BUNDLED_TRAIN_FILES, DEMO_VOCAB_SIZE)
    elif not tf.io.gfile.exists(spm_path):
        raise FileNotFoundError(
            f"SentencePiece model {spm_path} does not exist: give the path of a .model file "
            "(e.g. T5's gs://t5-data/vocabs/cc_all.32000/sentencepiece.model), or None for the "
            "demo vocabulary"
        )
    vocabulary = seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)
    try:
        tokenizer = vocabulary.tokenizer
    except Exception as error:
        raise ValueError(f"{spm_path} is not a readable SentencePiece model: {error}") from error
    if (tokenizer.pad_id(), tokenizer.eos_id()) != (0, 1):
        raise ValueError(
            f"{spm_path} has pad_id={tokenizer.pad_id()}, eos_id={tokenizer.eos_id()}; this "
            "codebase pads with 0 and ends sequences with 1 (T5's convention): retrain it with "
            "pad_id=0 eos_id=1 (train_sentencepiece does)"
        )
    return vocabulary


def check_sentinels(vocabulary: seqio.Vocabulary, needed: int) -> None:
    """Raises ValueError when `vocabulary` has fewer extra ids (sentinels) than `needed`."""
    have = vocabulary.extra_ids
    if have < needed:
        name = getattr(vocabulary, "sentencepiece_model_file", None) or repr(vocabulary)
        raise ValueError(
            f"vocabulary {name} has {have} extra ids but {needed} sentinels are needed: build it "
            f"with extra_ids >= {needed} (e.g. get_vocabulary(path, extra_ids={max(needed, 100)})) "
            "or lower the number of noise spans (noise density x length / mean span length)"
        )
