"""T5 1.1 (and T5 1.0) encoder-decoder as Flax Linen modules with logical axis names.

Shapes are named `[batch, length, embed]` etc.; every parameter carries logical axes (see
`e2s2_jax.training` for the rules that map them to mesh axes). Parameters are float32;
activations use `T5Config.dtype`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
PyTree = Any

# A large negative logit bias for masked attention positions (exp underflows to exactly 0).
NEG_INF = -1e10

FEED_FORWARD_PROJS = ("gated-gelu", "relu", "gated-relu", "gelu")
# What each decoder layer cross-attends (the EncoderFusion baselines of METHODS.md section 3):
# "none": the encoder's final output (T5); "layer_attention": a learned softmax-weighted sum of
# all encoder layers, the embedding layer included; "fine_grained_layer_attention": the same with
# one weight per layer and model dimension; "layerwise_coordination": decoder layer j attends
# encoder layer j (proportionally when the depths differ).
ENCODER_FUSIONS = (
    "none",
    "layer_attention",
    "fine_grained_layer_attention",
    "layerwise_coordination",
)
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes and options of a T5 model. Defaults are T5 1.1 small."""

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 6
    d_kv: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    # "gated-gelu" is T5 1.1 (tanh-approximate GELU, as HF's gelu_new); "relu" is T5 1.0.
    feed_forward_proj: str = "gated-gelu"
    # T5 1.0 ties the output projection to the input embedding and scales the decoder output
    # by d_model**-0.5 before it; T5 1.1 does neither. (HF 5.x can also tie without scaling.)
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                f"use one of {FEED_FORWARD_PROJS}."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"T5Config.remat_policy={self.remat_policy!r} is not supported; "
                f"use one of {REMAT_POLICIES}."
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"T5Config.dtype={self.dtype!r}: use float32, bfloat16 or float16.")

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")


def _activation(name: str) -> Callable[[Array], Array]:
    base = name.split("-")[-1]
    if base == "gelu":
        return functools.partial(jax.nn.gelu, approximate=True)
    return jax.nn.relu


def _normal(stddev: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


# ----------------------------------------------------------------------------- positions


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
            _normal(cfg.d_model**-0.5, ("relpos_buckets", "heads")),
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


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; computed in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
        )
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(variance + self.config.layer_norm_epsilon)
        return (scale * normed).astype(self.config.activation_dtype)


def dense_rows(x: Array, kernel: Array) -> Array:
    """`einsum("...d,df->...f", x, kernel)` as one 2-D matmul over the rows of `x` flattened
    to `[rows, d]`. (On the 3-D `[batch, length, d]` form, XLA:CPU lays out the backward's
    kernel-gradient operand transposed and materialises that transpose in a fused loop:
    about 1.5x the time of a T5 1.1 small feed-forward's forward and backward.)"""
    rows = x.reshape(-1, x.shape[-1])
    return jnp.dot(rows, kernel).reshape(*x.shape[:-1], kernel.shape[-1])


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


class Projection(nn.Module):
    """A bias-free projection `equation(x, kernel)` (`dense_rows`, `project_to_heads`, ...) of
    a float32 kernel created with its logical axes."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: Callable[[Array, Array], Array]
    stddev: float
    dtype: Any = jnp.float32
    # Overrides the normal(stddev) init (SurfaceFusion's zero-initialised W2).
    kernel_init: Callable | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = self.kernel_init or nn.initializers.normal(self.stddev)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.axes), self.shape, jnp.float32
        )
        return self.equation(x.astype(self.dtype), kernel.astype(self.dtype))


# The "cache" variables cross-attention projects once per decode (keys, values).
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


class FeedForward(nn.Module):
    """T5 feed-forward: gated (wi_0, wi_1) for T5 1.1, plain (wi) for T5 1.0."""

    config: T5Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = functools.partial(Projection, equation=dense_rows, dtype=cfg.activation_dtype)
        wi = functools.partial(
            dense, shape=(cfg.d_model, cfg.d_ff), axes=("embed", "mlp"), stddev=cfg.d_model**-0.5
        )
        activation = _activation(cfg.feed_forward_proj)
        if cfg.is_gated:
            hidden = activation(wi(name="wi_0")(x)) * wi(name="wi_1")(x)
        else:
            hidden = activation(wi(name="wi")(x))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=self.deterministic)
        out = dense(
            shape=(cfg.d_ff, cfg.d_model), axes=("mlp", "embed"), stddev=cfg.d_ff**-0.5, name="wo"
        )(hidden)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention then feed-forward, each with a residual. Scan-compatible."""

    config: T5Config
    deterministic: bool = True
    return_layer_output: bool = False

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> tuple[Array, Array | None]:
        cfg = self.config
        dropout = functools.partial(nn.Dropout(cfg.dropout_rate), deterministic=self.deterministic)
        normed = RMSNorm(cfg, name="pre_attention_norm")(x)
        x = x + dropout(
            MultiHeadAttention(cfg, deterministic=self.deterministic, name="attention")(
                normed, normed, bias
            )
        )
        normed = RMSNorm(cfg, name="pre_mlp_norm")(x)
        x = x + dropout(FeedForward(cfg, deterministic=self.deterministic, name="mlp")(normed))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, (x if self.return_layer_output else None)


class EncoderLayerAttention(nn.Module):
    """One decoder layer's memory for the layer-attention baselines: a softmax-weighted sum over
    the encoder's layers `[batch, layers + 1, length, embed]` -> `[batch, length, embed]`.

    One weight per layer (`fine_grained=False`) or per layer and model dimension. The weights
    start at zero, i.e. a uniform average.
    """

    config: T5Config
    fine_grained: bool = False

    @nn.compact
    def __call__(self, encoder_layers: Array) -> Array:
        num_layers, d_model = encoder_layers.shape[1], encoder_layers.shape[-1]
        shape, axes = (num_layers,), ("encoder_layers",)
        if self.fine_grained:
            shape, axes = (num_layers, d_model), ("encoder_layers", "embed")
        scores = self.param(
            "layer_scores", nn.with_logical_partitioning(nn.initializers.zeros, axes), shape
        )
        weights = jax.nn.softmax(scores, axis=0).astype(encoder_layers.dtype)
        if not self.fine_grained:
            weights = weights[:, None]
        return jnp.sum(encoder_layers * weights[None, :, None, :], axis=1)


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention, feed-forward. Scan-compatible.

    `encoded` is the cross-attention memory `[batch, length, embed]`, or for the layer-attention
    baselines (`encoder_fusion`) all encoder layers `[batch, layers + 1, length, embed]`.
    """

    config: T5Config
    deterministic: bool = True
    decode: bool = False
    cache_length: int = 0
    encoder_fusion: str = "none"

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array,
        self_bias: Array,
        cross_bias: Array,
        decode_position: Array | None,
    ) -> tuple[Array, None]:
        cfg = self.config
        dropout = functools.partial(nn.Dropout(cfg.dropout_rate), deterministic=self.deterministic)
        attention = functools.partial(
            MultiHeadAttention,
            cfg,
            decode=self.decode,
            cache_length=self.cache_length,
            deterministic=self.deterministic,
        )
        normed = RMSNorm(cfg, name="pre_self_attention_norm")(x)
        x = x + dropout(
            attention(name="self_attention")(normed, normed, self_bias, decode_position)
        )
        if self.encoder_fusion in ("layer_attention", "fine_grained_layer_attention"):
            encoded = EncoderLayerAttention(
                cfg,
                fine_grained=self.encoder_fusion == "fine_grained_layer_attention",
                name="encoder_layer_attention",
            )(encoded)
        normed = RMSNorm(cfg, name="pre_cross_attention_norm")(x)
        x = x + dropout(
            attention(is_cross_attention=True, name="encoder_decoder_attention")(
                normed, encoded, cross_bias
            )
        )
        normed = RMSNorm(cfg, name="pre_mlp_norm")(x)
        x = x + dropout(FeedForward(cfg, deterministic=self.deterministic, name="mlp")(normed))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


def _remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


def _stack_layer(
    layer_cls: type[nn.Module],
    config: T5Config,
    num_layers: int,
    num_args: int,
    scanned_args: tuple[int, ...] = (),
):
    """`layer_cls` wrapped for remat and, when `config.scan_layers`, `nn.scan` over layers.

    Arguments are broadcast to every layer, except those at `scanned_args`, which carry one
    slice per layer on their leading axis."""
    if config.remat_policy != "none":
        layer_cls = nn.remat(
            layer_cls, policy=_remat_policy(config.remat_policy), prevent_cse=not config.scan_layers
        )
    if config.scan_layers:
        layer_cls = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=tuple(0 if i in scanned_args else nn.broadcast for i in range(num_args)),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
    return layer_cls


# ----------------------------------------------------------------------------- stacks


@struct.dataclass
class EncoderOutputs:
    """What the encoder hands to heads and fusion layers.

    encoded: `[batch, length, embed]` final output, after the final norm.
    embedded: `[batch, length, embed]` source token embeddings (before dropout).
    layer_outputs: `[layers, batch, length, embed]` each layer's output, or None unless asked.
    mask: `[batch, length]` bool, true at non-pad positions.
    fusion_layers: `[batch, layers + 1, length, embed]` the embedding and every layer's output,
      each through the final norm (and dropout), for the EncoderFusion baselines; else None.
      (Batch first, so decoding can repeat every field along axis 0.)
    """

    encoded: Array
    embedded: Array
    mask: Array
    layer_outputs: Array | None = None
    fusion_layers: Array | None = None


class Encoder(nn.Module):
    """T5 encoder stack over a shared token embedding."""

    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        segment_ids: Array | None = None,
        *,
        deterministic: bool = True,
        return_layer_outputs: bool = False,
        return_fusion_layers: bool = False,
    ) -> EncoderOutputs:
        cfg = self.config
        mask = tokens != cfg.pad_id
        length = tokens.shape[1]
        position_bias = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(
            jnp.arange(length), length, length
        )
        bias = position_bias + attention_mask_bias(mask, mask, segment_ids, segment_ids)
        embedded = self.shared_embedding(tokens)
        x = nn.Dropout(cfg.dropout_rate)(embedded, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        keep_outputs = return_layer_outputs or return_fusion_layers
        layer_kwargs = dict(deterministic=deterministic, return_layer_output=keep_outputs)
        layer_cls = _stack_layer(EncoderLayer, cfg, cfg.num_encoder_layers, num_args=1)
        if cfg.scan_layers:
            x, layer_outputs = layer_cls(cfg, **layer_kwargs, name="layers")(x, bias)
        else:
            outputs = []
            for i in range(cfg.num_encoder_layers):
                x, out = layer_cls(cfg, **layer_kwargs, name=f"layers_{i}")(x, bias)
                outputs.append(out)
            layer_outputs = jnp.stack(outputs) if keep_outputs else None
        final_norm = RMSNorm(cfg, name="final_norm")
        dropout = functools.partial(nn.Dropout(cfg.dropout_rate), deterministic=deterministic)
        encoded = dropout(final_norm(x))
        fusion_layers = None
        if return_fusion_layers:
            # The final norm puts every layer on the scale the decoder expects of its memory
            # (pre-norm layer outputs grow with depth); the top one equals `encoded`.
            stack = jnp.concatenate([embedded[None], layer_outputs], axis=0)
            fusion_layers = dropout(jnp.moveaxis(final_norm(stack), 0, 1))
            fusion_layers = nn.with_logical_constraint(
                fusion_layers, ("batch", "layers", "length", "embed")
            )
        return EncoderOutputs(
            encoded=encoded,
            embedded=embedded,
            mask=mask,
            layer_outputs=layer_outputs if return_layer_outputs else None,
            fusion_layers=fusion_layers,
        )


def coordinated_encoder_layer(decoder_layer: int, num_encoder_layers: int, num_decoder_layers: int):
    """Layer-wise coordination: the index into `EncoderOutputs.fusion_layers` (0 = embedding)
    that decoder layer `decoder_layer` (0-based) attends: encoder layer j for decoder layer j
    at equal depths, proportionally (rounded up) otherwise, so the last attends the last."""
    return -(-(decoder_layer + 1) * num_encoder_layers // num_decoder_layers)


class Decoder(nn.Module):
    """T5 decoder stack; returns the final normed hidden states `[batch, length, embed]`.

    With `decode=True` it runs one step (`tokens` is `[batch, 1]`) at `decode_position`
    against a cache of `max_decode_length` positions, creating the cache on first use.
    `encoded` is `[batch, length, embed]`, or `EncoderOutputs.fusion_layers` when
    `encoder_fusion` is not "none" (see `ENCODER_FUSIONS`).
    """

    config: T5Config
    shared_embedding: nn.Module
    encoder_fusion: str = "none"

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        encoded: Array,
        encoder_mask: Array,
        decoder_valid: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decode_position: Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        max_decode_length: int = 0,
    ) -> Array:
        cfg = self.config
        batch, length = tokens.shape
        relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
        if decode:
            if length != 1 or decode_position is None or max_decode_length < 1:
                raise ValueError(
                    "decode=True takes one token per row, decode_position and "
                    "max_decode_length >= 1."
                )
            max_length = max_decode_length
            self_bias = relpos(jnp.reshape(decode_position, (1,)), max_length, max_length)
            seen = jnp.arange(max_length) <= decode_position
            self_bias = self_bias + jnp.where(seen, 0.0, NEG_INF)[None, None, None, :]
        else:
            if decoder_valid is None:
                decoder_valid = jnp.ones((batch, length), bool)
            self_bias = relpos(jnp.arange(length), length, length) + attention_mask_bias(
                decoder_valid,
                decoder_valid,
                decoder_segment_ids,
                decoder_segment_ids,
                causal=True,
            )
        cross_bias = attention_mask_bias(
            jnp.ones((batch, length), bool), encoder_mask, decoder_segment_ids, encoder_segment_ids
        )
        x = self.shared_embedding(tokens)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        coordinated = self.encoder_fusion == "layerwise_coordination"
        if coordinated:
            # One memory per decoder layer, stacked on a leading axis: [layers, batch, ...].
            indices = [
                coordinated_encoder_layer(i, cfg.num_encoder_layers, cfg.num_decoder_layers)
                for i in range(cfg.num_decoder_layers)
            ]
            encoded = jnp.moveaxis(encoded[:, jnp.asarray(indices)], 1, 0)
        layer_cls = _stack_layer(
            DecoderLayer,
            cfg,
            cfg.num_decoder_layers,
            num_args=4,
            scanned_args=(0,) if coordinated else (),
        )
        layer_kwargs = dict(
            deterministic=deterministic,
            decode=decode,
            cache_length=max_decode_length,
            encoder_fusion=self.encoder_fusion,
        )
        args = (encoded, self_bias, cross_bias, decode_position)
        if cfg.scan_layers:
            x, _ = layer_cls(cfg, **layer_kwargs, name="layers")(x, *args)
        else:
            for i in range(cfg.num_decoder_layers):
                layer_args = (encoded[i], *args[1:]) if coordinated else args
                x, _ = layer_cls(cfg, **layer_kwargs, name=f"layers_{i}")(x, *layer_args)
        x = RMSNorm(cfg, name="final_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class OutputProjection(nn.Module):
    """Decoder hidden states `[batch, length, embed]` to logits `[batch, length, vocab]`.

    The default output layer; SurfaceFusion (`models/fusion.py`) subclasses it, so that its
    head is this projection, under the same parameter path (`output_layer/logits_dense`).
    An output layer is called as `(decoder_hidden, encoder_outputs, shared_embedding,
    deterministic, *, decode, encoder_segment_ids, decoder_segment_ids)`.
    """

    config: T5Config

    @nn.compact
    def __call__(
        self,
        decoder_hidden: Array,
        encoder_outputs: EncoderOutputs | None,
        shared_embedding: nn.Embed,
        deterministic: bool = True,
        *,
        decode: bool = False,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
    ) -> Array:
        # The rest is used by fusion layers, not by the plain head.
        del encoder_outputs, deterministic, decode, encoder_segment_ids, decoder_segment_ids
        return self._output_head(shared_embedding)(decoder_hidden)

    def _output_head(self, shared_embedding: nn.Embed) -> Callable[[Array], Array]:
        """`[..., embed] -> float32 [..., vocab]` logits, tied/scaled as the config says. Creates
        `logits_dense`: call it once, from the compact `__call__`, and apply the result freely."""
        cfg = self.config
        dense = None
        if not cfg.tie_word_embeddings:
            dense = nn.DenseGeneral(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.activation_dtype,
                param_dtype=jnp.float32,
                kernel_init=_normal(cfg.d_model**-0.5, ("embed", "vocab")),
                name="logits_dense",
            )

        def head(hidden: Array) -> Array:
            if cfg.scale_decoder_outputs:
                hidden = hidden * cfg.d_model**-0.5
            rows = hidden.reshape(-1, hidden.shape[-1])  # 2-D matmul (see `dense_rows`)
            logits = shared_embedding.attend(rows) if dense is None else dense(rows)
            logits = logits.reshape(*hidden.shape[:-1], -1)
            logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
            return logits.astype(jnp.float32)

        return head


# A head receives the encoder outputs and returns any pytree (E2S2's heads, probes, ...).
HeadFactory = Callable[..., nn.Module]


class T5(nn.Module):
    """The encoder-decoder, with pluggable encoder heads and output layer.

    encoder_heads: `(name, factory)` pairs; each factory builds a module called as
      `head(encoder_outputs, deterministic=...)` whose result appears in
      `intermediates["heads"][name]`. Heads run in `__call__` only (pretraining).
    output_layer_factory: builds the module mapping decoder states to logits (or to fused
      log-probability scores, which the loss and decoding use as `fusion.scores_used_as_is`
      says), as `factory(config, name=...)`.
    encoder_fusion: what each decoder layer cross-attends, one of `ENCODER_FUSIONS`.
    """

    config: T5Config
    encoder_heads: Sequence[tuple[str, HeadFactory]] = ()
    output_layer_factory: Callable[..., nn.Module] = OutputProjection
    encoder_fusion: str = "none"

    def setup(self):
        cfg = self.config
        self.shared_embedding = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.activation_dtype,
            param_dtype=jnp.float32,
            embedding_init=_normal(1.0, ("vocab", "embed")),
            name="token_embedder",
        )
        if self.encoder_fusion not in ENCODER_FUSIONS:
            raise ValueError(
                f"T5.encoder_fusion={self.encoder_fusion!r}: use one of {ENCODER_FUSIONS}."
            )
        self.encoder = Encoder(cfg, self.shared_embedding, name="encoder")
        self.decoder = Decoder(
            cfg, self.shared_embedding, encoder_fusion=self.encoder_fusion, name="decoder"
        )
        self.output_layer = self.output_layer_factory(cfg, name="output_layer")
        self.heads = {
            name: factory(cfg, name=f"head_{name}") for name, factory in self.encoder_heads
        }

    def encode(
        self,
        encoder_input_tokens: Array,
        encoder_segment_ids: Array | None = None,
        *,
        enable_dropout: bool = False,
        return_layer_outputs: bool = False,
    ) -> EncoderOutputs:
        """Runs the encoder on `[batch, length]` tokens; see `EncoderOutputs`."""
        return self.encoder(
            encoder_input_tokens,
            encoder_segment_ids,
            deterministic=not enable_dropout,
            return_layer_outputs=return_layer_outputs,
            return_fusion_layers=self.encoder_fusion != "none",
        )

    def decode(
        self,
        encoder_outputs: EncoderOutputs,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        *,
        enable_dropout: bool = False,
        decode: bool = False,
        decode_position: Array | None = None,
        max_decode_length: int = 0,
    ) -> Array:
        """Logits `[batch, target_length, vocab]` (float32).

        Training: decoder positions whose `decoder_target_tokens` are pad are not attended to.
        Decoding (`decode=True`, `mutable=["cache"]`): one step, `decoder_input_tokens` of
        `[batch, 1]` at `decode_position`; the first call creates the cache (and projects the
        encoder output for cross-attention once).
        """
        decoder_valid = None
        if decoder_target_tokens is not None:
            decoder_valid = decoder_target_tokens != self.config.pad_id
        memory = encoder_outputs.encoded
        if self.encoder_fusion != "none":
            memory = encoder_outputs.fusion_layers
        hidden = self.decoder(
            decoder_input_tokens,
            memory,
            encoder_outputs.mask,
            decoder_valid,
            encoder_segment_ids,
            decoder_segment_ids,
            decode_position,
            deterministic=not enable_dropout,
            decode=decode,
            max_decode_length=max_decode_length,
        )
        return self.output_layer(
            hidden,
            encoder_outputs,
            self.shared_embedding,
            deterministic=not enable_dropout,
            decode=decode,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        *,
        enable_dropout: bool = False,
        return_intermediates: bool = False,
    ) -> Array | tuple[Array, dict[str, Any]]:
        """Logits `[batch, target_length, vocab]`; with `return_intermediates`, also a dict with
        `encoder` (EncoderOutputs, layer outputs included) and `heads` (each head's output)."""
        encoder_outputs = self.encode(
            encoder_input_tokens,
            encoder_segment_ids,
            enable_dropout=enable_dropout,
            return_layer_outputs=return_intermediates,
        )
        head_outputs = {
            name: head(encoder_outputs, deterministic=not enable_dropout)
            for name, head in self.heads.items()
        }
        logits = self.decode(
            encoder_outputs,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            enable_dropout=enable_dropout,
        )
        if not return_intermediates:
            return logits
        return logits, {"encoder": encoder_outputs, "heads": head_outputs}


# ----------------------------------------------------------------------------- layouts


def _layer_keys(stack: dict, prefix: str = "layers_") -> list[str]:
    return sorted((k for k in stack if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :]))


def scan_params(params: PyTree) -> PyTree:
    """Converts unscanned params (`layers_0`, `layers_1`, ...) to the `nn.scan` layout."""
    params = dict(params)
    for stack_name in ("encoder", "decoder"):
        stack = dict(params[stack_name])
        keys = _layer_keys(stack)
        if keys:
            stack["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[stack.pop(k) for k in keys])
        params[stack_name] = stack
    return params


def unscan_params(params: PyTree) -> PyTree:
    """Converts `nn.scan` params (a leading layer axis under `layers`) to `layers_i`."""
    params = dict(params)
    for stack_name in ("encoder", "decoder"):
        stack = dict(params[stack_name])
        if "layers" in stack:
            scanned = stack.pop("layers")
            num_layers = jax.tree.leaves(scanned)[0].shape[0]
            for i in range(num_layers):
                stack[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], scanned)
        params[stack_name] = stack
    return params
