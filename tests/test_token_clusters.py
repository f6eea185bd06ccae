"""C-RTS's cluster table: k-means recovers known clusters of a toy embedding, is reproducible
from its seed, and the `clusters` command builds a table the C-RTS view accepts."""

from __future__ import annotations

import numpy as np
import pytest

from e2s2_jax import token_clusters
from e2s2_jax.data import token_swaps


def toy_embedding(seed: int = 0, per_cluster: int = 40, num_clusters: int = 6, dim: int = 8):
    """Points around `num_clusters` well-separated directions; returns (points, true labels)."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:num_clusters] * 5.0
    labels = np.repeat(np.arange(num_clusters), per_cluster)
    points = directions[labels] + rng.normal(scale=0.5, size=(len(labels), dim))
    order = rng.permutation(len(labels))
    return points[order], labels[order]


def same_partition(found: np.ndarray, truth: np.ndarray) -> bool:
    """True when the two labelings group the points alike (up to renaming the clusters)."""
    pairs = set(zip(found.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(found.tolist())) == len(set(truth.tolist()))


def test_kmeans_recovers_known_clusters_and_is_reproducible():
    points, truth = toy_embedding()
    found, centroids = token_clusters.kmeans(points, 6, seed=0)
    assert same_partition(found, truth)
    # The centroids are the mean of their points (NumPy reference).
    for k in range(6):
        np.testing.assert_allclose(centroids[k], points[found == k].mean(axis=0), rtol=1e-12)
    again, _ = token_clusters.kmeans(points, 6, seed=0)
    np.testing.assert_array_equal(again, found)
    # Another seed on harder data (overlapping blobs, more clusters asked) gives another answer.
    noisy = points + np.random.default_rng(1).normal(scale=3.0, size=points.shape)
    results = {token_clusters.kmeans(noisy, 12, seed=s)[0].tobytes() for s in range(3)}
    assert len(results) > 1
    with pytest.raises(ValueError, match="num_clusters=300"):
        token_clusters.kmeans(points, 300)


def test_token_clusters_skip_special_ids(vocabulary):
    regular = token_swaps.regular_id_mask(vocabulary)
    assert not regular[[0, 1, 2]].any() and not regular[-100:].any() and regular.sum() == 997
    points, truth = toy_embedding(per_cluster=200, num_clusters=5)
    embedding = np.zeros((1152, 8))  # the model's vocabulary padded past the tokenizer's
    embedding[np.flatnonzero(regular)] = points[: regular.sum()]
    clusters = token_clusters.token_clusters(embedding, regular, 5, seed=0)
    assert clusters.shape == (1100,) and (clusters[~regular] == -1).all()
    assert same_partition(clusters[regular], truth[: regular.sum()])
    with pytest.raises(ValueError, match="the embedding has 10 rows"):
        token_clusters.token_clusters(embedding[:10], regular, 5)


def test_clusters_command_builds_a_table_c_rts_reads(vocabulary, tmp_path, capsys):
    import jax

    from e2s2_jax.interop import params_io
    from e2s2_jax.main import main
    from e2s2_jax.models.config import T5Config

    config = T5Config(
        vocab_size=1152,
        d_model=16,
        num_heads=2,
        d_kv=8,
        d_ff=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
    )
    embedding = np.asarray(jax.random.normal(jax.random.key(0), (1152, 16)), np.float32)
    params_io.save_params(
        str(tmp_path / "params"), config, {"token_embedder": {"embedding": embedding}}
    )
    output = tmp_path / "clusters.npy"
    argv = [
        "clusters",
        f"--params_dir={tmp_path / 'params'}",
        f"--output={output}",
        "--num_clusters=20",
        f"--vocabulary_model={vocabulary.sentencepiece_model_file}",
    ]
    assert main(argv) == 0, capsys.readouterr()
    assert "20 clusters" in capsys.readouterr().out
    clusters = np.load(output, allow_pickle=False)
    regular = token_swaps.regular_id_mask(vocabulary)
    reference = token_clusters.token_clusters(embedding, regular, 20, seed=0)
    np.testing.assert_array_equal(clusters, reference)
    table = token_swaps.load_cluster_file(str(output), vocabulary)
    assert table.group_size.sum() == regular.sum() and len(table.group_size) == 20
    # A checkpoint whose embedding is smaller than the vocabulary: exit 2, one line.
    small = T5Config(
        vocab_size=64,
        d_model=16,
        num_heads=2,
        d_kv=8,
        d_ff=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
    )
    params_io.save_params(
        str(tmp_path / "small"), small, {"token_embedder": {"embedding": embedding[:64]}}
    )
    argv[1] = f"--params_dir={tmp_path / 'small'}"
    assert main(argv) == 2
    assert "the embedding has 64 rows but the vocabulary has 1100 ids" in capsys.readouterr().err
