"""T5 attention: the relative position bias, attention masks, and multi-head attention with its
decode-time key/value cache (including beam search's grouped queries)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from e2s2_jax.models.attention_entropy import ENTROPY_COLLECTION, query_entropy
from e2s2_jax.models.config import NEG_INF, T5Config, normal_init
from e2s2_jax.models.layers import Projection, dense_rows

Array = jax.Array


@functools.lru_cache(maxsize=64)
def relative_position_bucket_table(
    max_distance_back: int,
    max_distance_forward: int,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> np.ndarray:
    """Bucket of every relative position `key - query` in [-back, forward], as int32.

    Index `r + max_distance_back` holds the bucket of relative position `r`. Computed on the
    host in float32 with T5's rule, so the jitted code only gathers.
    """
    relative_position = np.arange(-max_distance_back, max_distance_forward + 1, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(distance.astype(np.float32) / np.float32(max_exact))
            / np.float32(np.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    buckets += np.where(is_small, distance, large)
    return buckets.astype(np.int32)


class RelativePositionBias(nn.Module):
    """Learned T5 relative position bias, one per stack: returns `[1, heads, q_len, k_len]`."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: Array, k_len: int, max_query_position: int) -> Array:
        """`query_positions` is `[q_len]` int32 (absolute index of each query)."""
        cfg = self.config
        table = relative_position_bucket_table(
            max_query_position,
            k_len,
            self.bidirectional,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        relative = jnp.arange(k_len)[None, :] - query_positions[:, None]
        buckets = jnp.asarray(table)[relative + max_query_position]
        embedding = self.param(
            "rel_embedding",
            normal_init(cfg.d_model**-0.5, ("relpos_buckets", "heads")),
            (cfg.relative_attention_num_buckets, cfg.num_heads),
        )
        bias = jnp.take(embedding, buckets, axis=0)  # [q, k, heads]
        return jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)


def attention_mask_bias(
    query_valid: Array,
    key_valid: Array,
    query_segment_ids: Array | None = None,
    key_segment_ids: Array | None = None,
    causal: bool = False,
) -> Array:
    """Additive mask `[batch, 1, q_len, k_len]` in float32: 0 where attending, NEG_INF elsewhere.

    Padding masks keys only (as Hugging Face does), so outputs at padded query positions are
    defined but meaningless; packing (segment ids) keeps attention within a segment.
    """
    allowed = jnp.broadcast_to(
        key_valid[:, None, :], (*key_valid.shape[:1], query_valid.shape[1], key_valid.shape[1])
    )
    if query_segment_ids is not None and key_segment_ids is not None:
        allowed &= query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
    if causal:
        q_len, k_len = query_valid.shape[1], key_valid.shape[1]
        allowed &= jnp.arange(q_len)[:, None] >= jnp.arange(k_len)[None, :]
    return jnp.where(allowed, 0.0, NEG_INF)[:, None].astype(jnp.float32)


# ----------------------------------------------------------------------------- attention


def project_to_heads(x: Array, kernel: Array, *, heads: int) -> Array:
    """`[batch, length, d] @ [d, heads * kv]` as one 2-D matmul, then split into
    `[batch, heads, length, kv]`."""
    batch, length, _ = x.shape
    flat = dense_rows(x, kernel)
    return flat.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)


def project_from_heads(x: Array, kernel: Array) -> Array:
    """`[batch, heads, length, kv]` joined back to `[batch, length, heads * kv]`, then one 2-D
    matmul with the `[heads * kv, d]` kernel."""
    batch, heads, length, kv = x.shape
    flat = x.transpose(0, 2, 1, 3).reshape(batch, length, heads * kv)
    return dense_rows(flat, kernel)


CROSS_ATTENTION_CACHE = ("cross_key", "cross_value")


class MultiHeadAttention(nn.Module):
    """T5 attention (no 1/sqrt(d) scaling: it is folded into the query init).

    Queries, keys and values are projected straight to `[batch, heads, length, kv]`, so that
    scores and context are canonical batched matmuls (batch and heads leading); the output
    projection contracts heads and kv back to `[batch, length, embed]`. The kernels are stored
    2-D, `[embed, joined_kv]` / `[joined_kv, embed]` with `joined_kv = heads * kv` (the layout
    of Mesh TensorFlow's T5 and of Hugging Face's), so Adafactor factors their second moments
    over embed and joined_kv as t5x's factor rules do. (Stored `[embed, heads, kv]`, optax's
    Adafactor factors the two largest dimensions only when both are at least 128: kv is 64, so
    it kept a full second moment for every attention kernel.)

    With `decode=True` keys and values are cached in the same layout: self-attention writes the
    current step at `decode_position` into a `[batch, heads, cache_length, kv]` cache;
    cross-attention projects the encoder output once, on the call that creates the cache, and
    reuses it (`[batch, heads, source_length, kv]`). When the queries have a multiple of the
    cached keys' rows (beam search: `beams` adjacent rows per cached row), each row's queries
    attend its keys and values as one group, so the cache is not repeated per beam.
    """

    config: T5Config
    is_cross_attention: bool = False
    decode: bool = False
    cache_length: int = 0
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, inputs_q: Array, inputs_kv: Array, bias: Array, decode_position: Array | None = None
    ) -> Array:
        cfg = self.config
        joined_kv = cfg.num_heads * cfg.d_kv
        dense = functools.partial(
            Projection,
            shape=(cfg.d_model, joined_kv),
            equation=functools.partial(project_to_heads, heads=cfg.num_heads),
            dtype=cfg.activation_dtype,
        )
        qkv_axes = ("embed", "joined_kv")
        query = dense(axes=qkv_axes, stddev=(cfg.d_model * cfg.d_kv) ** -0.5, name="query")(
            inputs_q
        )
        key_proj = dense(axes=qkv_axes, stddev=cfg.d_model**-0.5, name="key")
        value_proj = dense(axes=qkv_axes, stddev=cfg.d_model**-0.5, name="value")

        if self.decode and self.is_cross_attention:
            key, value = self._cached_cross_kv(key_proj, value_proj, inputs_kv)
        else:
            key, value = key_proj(inputs_kv), value_proj(inputs_kv)
        if self.decode and not self.is_cross_attention:
            key, value = self._append_to_cache(key, value, decode_position)

        # Beam search keeps one cross-attention key/value cache per input row for its beams:
        # their queries then attend it as one group (`groups` queries per row and head).
        groups = query.shape[0] // key.shape[0]
        if groups > 1:
            bias = group_rows(jnp.broadcast_to(bias, (*query.shape[:1], *bias.shape[1:])), groups)
            query = group_rows(query, groups)
        query = nn.with_logical_constraint(query, ("batch", "heads", "length", "kv"))
        key = nn.with_logical_constraint(key, ("batch", "heads", "length", "kv"))
        value = nn.with_logical_constraint(value, ("batch", "heads", "length", "kv"))
        scores = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
        if self.is_mutable_collection(ENTROPY_COLLECTION) and not self.decode:
            # Only the train step's entropy variant makes this collection mutable: every other
            # program traces nothing here (`models/attention_entropy.py`).
            self.sow(ENTROPY_COLLECTION, "entropy", query_entropy(scores + bias))
        weights = jax.nn.softmax(scores + bias, axis=-1).astype(cfg.activation_dtype)
        weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=self.deterministic)
        context = jnp.einsum("bhqk,bhkd->bhqd", weights, value)
        if groups > 1:
            context = ungroup_rows(context, groups)
        out = Projection(
            shape=(joined_kv, cfg.d_model),
            axes=("joined_kv", "embed"),
            equation=project_from_heads,
            stddev=(cfg.num_heads * cfg.d_kv) ** -0.5,
            dtype=cfg.activation_dtype,
            name="out",
        )(context)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def _cached_cross_kv(self, key_proj, value_proj, encoded: Array) -> tuple[Array, Array]:
        return cache_once(
            self, CROSS_ATTENTION_CACHE, lambda: (key_proj(encoded), value_proj(encoded))
        )

    def _append_to_cache(self, key: Array, value: Array, position: Array):
        """Writes this step's `[batch, heads, 1, kv]` key/value at `position`; returns the
        `[batch, heads, cache_length, kv]` cache."""
        shape = (*key.shape[:2], self.cache_length, key.shape[3])
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        start = (0, 0, position, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        return cached_key.value, cached_value.value


def group_rows(x: Array, groups: int) -> Array:
    """`[rows * groups, heads, q, d] -> [rows, heads, groups * q, d]`: the `groups` adjacent
    rows of each row (its beams) become extra query positions."""
    rows_groups, heads, q, d = x.shape
    rows = rows_groups // groups
    x = x.reshape(rows, groups, heads, q, d).transpose(0, 2, 1, 3, 4)
    return x.reshape(rows, heads, groups * q, d)


def ungroup_rows(x: Array, groups: int) -> Array:
    """The inverse of `group_rows`: `[rows, heads, groups * q, d]` back to
    `[rows * groups, heads, q, d]`."""
    rows, heads, groups_q, d = x.shape
    x = x.reshape(rows, heads, groups, groups_q // groups, d).transpose(0, 2, 1, 3, 4)
    return x.reshape(rows * groups, heads, groups_q // groups, d)


def cache_once(
    module: nn.Module, names: tuple[str, ...], compute: Callable[[], tuple[Array, ...]]
) -> tuple[Array, ...]:
    """Decode-time values over the source (projected keys, values): computed on the call that
    creates the cache and stored under `names` in `module`'s "cache" collection, read back on
    every later step. (Beam search leaves them alone: they are equal across a row's beams.)"""
    if module.has_variable("cache", names[0]):
        return tuple(module.get_variable("cache", name) for name in names)
    values = compute()
    for name, value in zip(names, values, strict=True):
        module.variable("cache", name, lambda value=value: value)
    return values
