"""The jobs' shared helpers: the vocabulary lookup order, the batch-size check and the job mesh."""

import gzip

import jax
import pytest

from e2s2_jax.data import vocab
from e2s2_jax.data.corpus import BUNDLED_VALIDATION_FILES
from e2s2_jax.data.text_source import read_text_documents
from e2s2_jax.errors import ConfigError
from e2s2_jax.training import partitioning
from e2s2_jax.training.input_pipeline import lookup_vocabulary


def test_vocabulary_lookup_order(tmp_path):
    """An explicit SentencePiece file wins over the task's vocabulary; a bad one is a
    ConfigError naming the setting."""
    corpus = tmp_path / "small.txt.gz"
    documents = list(read_text_documents(BUNDLED_VALIDATION_FILES))[:200]
    corpus.write_bytes(gzip.compress("\n".join(documents).encode()))
    path = vocab.train_sentencepiece([str(corpus)], 300, cache_dir=str(tmp_path))

    explicit = lookup_vocabulary("bundled_span_corruption", path)
    assert explicit.sentencepiece_model_file == path
    assert explicit.vocab_size == 300 + 100
    task_vocabulary = lookup_vocabulary("bundled_span_corruption")
    assert task_vocabulary.sentencepiece_model_file != path
    with pytest.raises(ConfigError, match="vocabulary_model=.*nope.model does not exist"):
        lookup_vocabulary(None, str(tmp_path / "nope.model"))
    with pytest.raises(ConfigError, match="'no_such_task' is not registered"):
        lookup_vocabulary("no_such_task")


def test_batch_size_check_and_job_mesh_name_the_setting():
    mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
    partitioning.check_batch_size(6, mesh, num_microbatches=3, num_processes=2)
    with pytest.raises(ConfigError, match="Batch size 6 is not divisible by the 4 processes"):
        partitioning.check_batch_size(6, num_processes=4)
    with pytest.raises(
        ConfigError,
        match=r"train.batch_size=6 is not divisible by 4 = .* x num_microbatches 4\. set "
        r"--gin.train.batch_size to a multiple of 4, .*train.num_microbatches",
    ):
        partitioning.check_batch_size(6, mesh, num_microbatches=4, setting="train.batch_size")
    with pytest.raises(ConfigError, match=r"infer.mesh_shape=\(\d+, 1, 1\): Mesh sizes"):
        partitioning.job_mesh("infer", (2 * jax.device_count(), 1, 1))
