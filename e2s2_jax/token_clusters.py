"""C-RTS's token -> cluster table: seeded k-means over a checkpoint's input embeddings, and the
command that builds it from any checkpoint of this project or an imported (or Hugging Face) T5.

    python -m e2s2_jax.main clusters --params_dir DIR --output clusters.npy \\
        [--num_clusters 256] [--seed 0] [--vocabulary_model spiece.model]

The file is a `.npy` int32 array with one entry per vocabulary id: the id's cluster, or -1 for
pad, eos, unk and the sentinels (which C-RTS never substitutes). Read it with
`e2s2_jax.data.token_swaps.load_cluster_file` (no pickle).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from e2s2_jax.errors import EXIT_BAD_INPUT

UNCLUSTERED = -1


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """`[points, centroids]` squared Euclidean distances (float64)."""
    return (
        np.sum(points**2, axis=1)[:, None]
        - 2.0 * points @ centroids.T
        + np.sum(centroids**2, axis=1)[None, :]
    ).clip(min=0.0)


def kmeans(
    points: np.ndarray, num_clusters: int, seed: int = 0, max_iterations: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; the same seed gives the same result.

    Args:
      points: `[n, d]` float points.
      num_clusters: k, at most n.
      seed: seeds the k-means++ draws (and the re-seeding of a cluster that empties).
      max_iterations: Lloyd iterations at most; stops earlier once no assignment changes.

    Returns:
      `(assignments int32 [n], centroids float64 [k, d])`; every cluster is non-empty.
    """
    points = np.asarray(points, np.float64)
    num_points = len(points)
    if not 1 <= num_clusters <= num_points:
        raise ValueError(f"num_clusters={num_clusters} must be in [1, {num_points}] (the points).")
    rng = np.random.default_rng(seed)
    centroids = np.empty((num_clusters, points.shape[1]))
    centroids[0] = points[rng.integers(num_points)]
    nearest = _squared_distances(points, centroids[:1])[:, 0]
    for k in range(1, num_clusters):
        total = nearest.sum()
        index = rng.choice(num_points, p=nearest / total) if total > 0 else rng.integers(num_points)
        centroids[k] = points[index]
        nearest = np.minimum(nearest, _squared_distances(points, centroids[k : k + 1])[:, 0])
    assignments = np.full(num_points, -1)
    for _ in range(max_iterations):
        distances = _squared_distances(points, centroids)
        new_assignments = np.argmin(distances, axis=1)
        for k in np.flatnonzero(np.bincount(new_assignments, minlength=num_clusters) == 0):
            # An empty cluster takes the point farthest from its centroid.
            farthest = int(np.argmax(distances[np.arange(num_points), new_assignments]))
            new_assignments[farthest] = k
            distances[farthest] = 0.0
        if np.array_equal(new_assignments, assignments):
            break
        assignments = new_assignments
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignments, points)
        centroids = sums / np.bincount(assignments, minlength=num_clusters)[:, None]
    return assignments.astype(np.int32), centroids


def token_clusters(
    embedding: np.ndarray, regular: np.ndarray, num_clusters: int, seed: int = 0
) -> np.ndarray:
    """int32 `[len(regular)]`: the k-means cluster of each regular id's embedding row (rows
    L2-normalised, so clusters group directions, as cosine similarity does), -1 elsewhere.

    embedding: `[model vocab, d]`, at least as many rows as `regular` (the model's vocabulary
    may be padded past the tokenizer's); regular: bool `[vocabulary size]`.
    """
    if embedding.shape[0] < len(regular):
        raise ValueError(
            f"the embedding has {embedding.shape[0]} rows but the vocabulary has "
            f"{len(regular)} ids: use the vocabulary the checkpoint was trained with."
        )
    rows = np.asarray(embedding[: len(regular)], np.float64)[regular]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    clusters = np.full(len(regular), UNCLUSTERED, np.int32)
    clusters[regular], _ = kmeans(rows, num_clusters, seed)
    return clusters


def input_embedding(checkpoint: str) -> np.ndarray:
    """The input embedding `[vocab, d]` of a params directory, a train run's MODEL_DIR or a
    Hugging Face T5 directory (config.json + safetensors)."""
    from e2s2_jax.interop import hf, params_io

    if os.path.isfile(os.path.join(checkpoint, hf.CONFIG_FILE)):
        _, params = hf.import_hf(checkpoint)
    else:
        _, params = params_io.load_params(checkpoint)
    return np.asarray(params["token_embedder"]["embedding"])


def main(argv: list[str] | None = None) -> int:
    """The `clusters` command; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m e2s2_jax.main clusters",
        description="Build C-RTS's token -> cluster table by k-means over a checkpoint's input "
        "embeddings.",
    )
    parser.add_argument(
        "--params_dir",
        required=True,
        help="a train run's MODEL_DIR, an imported params directory, or a Hugging Face T5 dir",
    )
    parser.add_argument("--output", required=True, help="the .npy file to write")
    parser.add_argument("--num_clusters", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vocabulary_model",
        default=None,
        help="the SentencePiece model of the checkpoint's vocabulary (default: the demo's)",
    )
    args = parser.parse_args(argv)
    from e2s2_jax.data.token_swaps import regular_id_mask
    from e2s2_jax.data.vocab import get_vocabulary

    try:
        vocabulary = get_vocabulary(args.vocabulary_model)
        embedding = input_embedding(args.params_dir)
        clusters = token_clusters(
            embedding, regular_id_mask(vocabulary), args.num_clusters, args.seed
        )
        np.save(args.output, clusters)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sizes = np.bincount(clusters[clusters >= 0])
    print(
        f"wrote {args.output}: {len(clusters)} ids, {args.num_clusters} clusters of "
        f"{sizes.min()}-{sizes.max()} ids (median {int(np.median(sizes))})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
