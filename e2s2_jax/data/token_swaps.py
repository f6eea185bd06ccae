"""Token substitution for RTS, C-RTS and SLM: a table of which ids may stand in for which (every
regular id for one another, or the ids of the same k-means cluster), and the TensorFlow op that
swaps a fraction of a sequence's regular tokens for substitutes from their own group.

"Regular" ids are all but pad, eos, unk and the sentinels (the vocabulary's extra ids): those
are never substituted and never substitutes.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import seqio
import tensorflow as tf

from e2s2_jax.errors import ConfigError


def regular_id_mask(vocabulary: seqio.Vocabulary) -> np.ndarray:
    """bool `[vocab_size]`: true for every id that is not pad, eos, unk or a sentinel."""
    first_extra_id = vocabulary.vocab_size - (vocabulary.extra_ids or 0)
    regular = np.arange(vocabulary.vocab_size) < first_extra_id
    for token_id in (vocabulary.pad_id, vocabulary.eos_id, getattr(vocabulary, "unk_id", None)):
        if token_id is not None and 0 <= token_id < vocabulary.vocab_size:
            regular[token_id] = False
    return regular


@dataclasses.dataclass(frozen=True)
class SubstitutionTable:
    """Which ids may replace which: ids in one group replace one another.

    group_of: int32 `[vocab_size]`, each id's group, -1 for ids never substituted.
    members: int32 `[regular ids]`, every grouped id, sorted by group (then id).
    group_start, group_size: int32 `[groups]`, each group's slice of `members`.
    rank_in_group: int32 `[vocab_size]`, each id's index within its group's slice (0 if none).
    """

    group_of: np.ndarray
    members: np.ndarray
    group_start: np.ndarray
    group_size: np.ndarray
    rank_in_group: np.ndarray

    @classmethod
    def from_groups(cls, group_of: np.ndarray) -> SubstitutionTable:
        """The table of `group_of` (int `[vocab_size]`, -1 for ungrouped ids; groups 0..G-1)."""
        group_of = np.asarray(group_of, np.int64)
        num_groups = int(group_of.max()) + 1 if (group_of >= 0).any() else 0
        grouped = np.flatnonzero(group_of >= 0)
        members = grouped[np.argsort(group_of[grouped], kind="stable")]
        group_size = np.bincount(group_of[grouped], minlength=num_groups)
        group_start = np.concatenate([[0], np.cumsum(group_size)[:-1]]).astype(np.int64)
        rank_in_group = np.zeros(len(group_of), np.int64)
        rank_in_group[members] = np.arange(len(members)) - group_start[group_of[members]]
        return cls(
            group_of=group_of.astype(np.int32),
            members=members.astype(np.int32),
            group_start=group_start.astype(np.int32),
            group_size=group_size.astype(np.int32),
            rank_in_group=rank_in_group.astype(np.int32),
        )


def uniform_table(vocabulary: seqio.Vocabulary) -> SubstitutionTable:
    """RTS's table: one group of every regular id (uniform substitutes)."""
    return SubstitutionTable.from_groups(np.where(regular_id_mask(vocabulary), 0, -1))


def cluster_table(cluster_of_token: np.ndarray, vocabulary: seqio.Vocabulary) -> SubstitutionTable:
    """C-RTS's table from a token -> cluster array of the vocabulary's size; special ids are
    left out of every cluster whatever the array says. Raises ConfigError on a size mismatch."""
    cluster_of_token = np.asarray(cluster_of_token)
    if cluster_of_token.shape != (vocabulary.vocab_size,):
        raise ConfigError(
            f"the cluster table has shape {cluster_of_token.shape} but the vocabulary has "
            f"{vocabulary.vocab_size} ids: build it for this vocabulary with `python -m "
            "e2s2_jax.main clusters --params_dir CHECKPOINT --output FILE` (and the same "
            "--vocabulary_model as the task)."
        )
    return SubstitutionTable.from_groups(
        np.where(regular_id_mask(vocabulary), cluster_of_token, -1)
    )


def load_cluster_file(path: str, vocabulary: seqio.Vocabulary) -> SubstitutionTable:
    """C-RTS's table from a `.npy` file of int cluster ids, one per vocabulary id (written by
    `e2s2_jax.token_clusters`; read without pickle). Problems raise ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"cluster_file={path!r} does not exist: build one with `python -m e2s2_jax.main "
            "clusters --params_dir CHECKPOINT --output FILE`."
        )
    try:
        clusters = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ConfigError(f"cluster_file={path!r} is not a .npy array file ({error}).") from error
    if clusters.dtype.kind not in "iu":
        raise ConfigError(f"cluster_file={path!r} holds {clusters.dtype}, not integer cluster ids.")
    return cluster_table(clusters, vocabulary)


def check_swap_rate(swap_rate: float, setting: str = "swap_rate") -> None:
    """Raises ConfigError unless 0 < swap_rate < 1."""
    if not 0.0 < float(swap_rate) < 1.0:
        raise ConfigError(
            f"{setting}={swap_rate}: the fraction of tokens to substitute must be in (0, 1); "
            "RTS, C-RTS and SLM use 0.15."
        )


def swap_tokens(
    tokens: tf.Tensor, seed: tf.Tensor, table: SubstitutionTable, swap_rate: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (tokens with substitutes, replaced bool `[length]`) for int32 `tokens` `[length]`.

    floor(swap_rate * regular tokens + u) positions (u uniform in [0, 1): swap_rate of the
    regular tokens in expectation, also in short sequences) are drawn uniformly among the
    positions whose token has another member in its group (fewer if fewer are). Each gets a
    member of its group drawn uniformly among the others, so a replaced token always changes
    and stays in its group. Ungrouped ids (pad, eos, unk, sentinels) are never drawn.
    """
    tokens = tf.cast(tokens, tf.int32)
    num_tokens = tf.size(tokens)
    group = tf.gather(tf.constant(table.group_of), tokens)
    is_regular = group >= 0
    group_index = tf.maximum(group, 0)
    group_size = tf.where(is_regular, tf.gather(tf.constant(table.group_size), group_index), 0)
    eligible = group_size >= 2
    num_regular = tf.cast(tf.reduce_sum(tf.cast(is_regular, tf.int32)), tf.float64)
    count_seed, position_seed, member_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3)
    )
    # floor(rate * n + u), u uniform in [0, 1): rate * n swaps in expectation, whatever n.
    fraction = tf.random.stateless_uniform([], seed=count_seed, dtype=tf.float64)
    num_swaps = tf.cast(tf.floor(num_regular * swap_rate + fraction), tf.int32)
    num_swaps = tf.minimum(num_swaps, tf.reduce_sum(tf.cast(eligible, tf.int32)))
    scores = tf.where(eligible, tf.random.stateless_uniform([num_tokens], seed=position_seed), -1.0)
    _, chosen = tf.math.top_k(scores, k=num_swaps, sorted=False)
    replaced = tf.cast(tf.scatter_nd(chosen[:, None], tf.ones_like(chosen), [num_tokens]), tf.bool)
    # A uniform rank among the group's other members: draw in [0, size - 1), skip the token's own.
    draw = tf.random.stateless_uniform(
        [num_tokens], seed=member_seed, minval=0, maxval=2**30, dtype=tf.int32
    ) % tf.maximum(group_size - 1, 1)
    own_rank = tf.gather(tf.constant(table.rank_in_group), tokens)
    rank = draw + tf.cast(draw >= own_rank, tf.int32)
    start = tf.gather(tf.constant(table.group_start), group_index)
    substitutes = tf.gather(tf.constant(table.members), tf.where(eligible, start + rank, 0))
    return tf.where(replaced, substitutes, tokens), replaced
