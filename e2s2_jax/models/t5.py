"""T5 1.1 (and T5 1.0) encoder-decoder as Flax Linen modules with logical axis names: the
encoder and decoder stacks, the model (`T5`: encode / decode / __call__) with its pluggable
encoder heads, output layer and encoder fusion, and the conversion to and from the scan layout.

Shapes are named `[batch, length, embed]` etc.; every parameter carries logical axes (see
`e2s2_jax.training` for the rules that map them to mesh axes). Parameters are float32;
activations use `T5Config.dtype`. The pieces live by kind: `config`, `layers`, `attention`, and
the plug-ins `heads`, `fusion` (SurfaceFusion) and `encoder_fusion`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from e2s2_jax.models.attention import MultiHeadAttention, RelativePositionBias, attention_mask_bias
from e2s2_jax.models.attention_entropy import ENTROPY_COLLECTION
from e2s2_jax.models.config import NEG_INF, T5Config, normal_init
from e2s2_jax.models.encoder_fusion import check_encoder_fusion_factory
from e2s2_jax.models.layers import FeedForward, RMSNorm

Array = jax.Array
PyTree = Any

# Builds a decoder layer's EncoderFusion module (`models/encoder_fusion.py`), as
# `factory(config, name=...)`.
EncoderFusionFactory = Callable[..., nn.Module]


# ----------------------------------------------------------------------------- layers


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


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention, feed-forward. Scan-compatible.

    `encoded` is the cross-attention memory `[batch, length, embed]`, or with an
    `encoder_fusion_factory` all encoder layers `[batch, layers + 1, length, embed]`, which this
    layer's fusion module (given `layer_index`, this layer's 0-based index) turns into its memory.
    """

    config: T5Config
    deterministic: bool = True
    decode: bool = False
    cache_length: int = 0
    encoder_fusion_factory: EncoderFusionFactory | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array,
        self_bias: Array,
        cross_bias: Array,
        decode_position: Array | None,
        layer_index: Array | int,
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
        if self.encoder_fusion_factory is not None:
            # The name is the parameter path of the layer-attention baselines' checkpoints.
            fusion = self.encoder_fusion_factory(cfg, name="encoder_layer_attention")
            encoded = fusion(encoded, layer_index)
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
            variable_axes={"params": 0, "cache": 0, ENTROPY_COLLECTION: 0},
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


class Decoder(nn.Module):
    """T5 decoder stack; returns the final normed hidden states `[batch, length, embed]`.

    With `decode=True` it runs one step (`tokens` is `[batch, 1]`) at `decode_position`
    against a cache of `max_decode_length` positions, creating the cache on first use.
    `encoded` is `[batch, length, embed]`, or `EncoderOutputs.fusion_layers` with an
    `encoder_fusion_factory` (see `models/encoder_fusion.py`).
    """

    config: T5Config
    shared_embedding: nn.Module
    encoder_fusion_factory: EncoderFusionFactory | None = None

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
        # Each layer gets its 0-based index (for the EncoderFusion modules): scanned, one per layer.
        layer_cls = _stack_layer(
            DecoderLayer, cfg, cfg.num_decoder_layers, num_args=5, scanned_args=(4,)
        )
        layer_kwargs = dict(
            deterministic=deterministic,
            decode=decode,
            cache_length=max_decode_length,
            encoder_fusion_factory=self.encoder_fusion_factory,
        )
        args = (encoded, self_bias, cross_bias, decode_position)
        if cfg.scan_layers:
            layer_indices = jnp.arange(cfg.num_decoder_layers)
            x, _ = layer_cls(cfg, **layer_kwargs, name="layers")(x, *args, layer_indices)
        else:
            for i in range(cfg.num_decoder_layers):
                x, _ = layer_cls(cfg, **layer_kwargs, name=f"layers_{i}")(x, *args, i)
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
                kernel_init=normal_init(cfg.d_model**-0.5, ("embed", "vocab")),
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
      `head(encoder_outputs, deterministic=...)` (plus `shared_embedding=` when the head has
      `ties_input_embedding`) whose result appears in `intermediates["heads"][name]`. Heads run
      in `__call__` only (pretraining).
    output_layer_factory: builds the module mapping decoder states to logits (or to fused
      log-probability scores, which the loss and decoding use as `fusion.scores_used_as_is`
      says), as `factory(config, name=...)`.
    encoder_fusion_factory: builds each decoder layer's EncoderFusion module (the baselines of
      `models/encoder_fusion.py`), as `factory(config, name=...)`; None (T5): every decoder layer
      cross-attends the encoder's final output.
    """

    config: T5Config
    encoder_heads: Sequence[tuple[str, HeadFactory]] = ()
    output_layer_factory: Callable[..., nn.Module] = OutputProjection
    encoder_fusion_factory: EncoderFusionFactory | None = None

    def setup(self):
        cfg = self.config
        self.shared_embedding = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.activation_dtype,
            param_dtype=jnp.float32,
            embedding_init=normal_init(1.0, ("vocab", "embed")),
            name="token_embedder",
        )
        check_encoder_fusion_factory(self.encoder_fusion_factory)
        self.encoder = Encoder(cfg, self.shared_embedding, name="encoder")
        self.decoder = Decoder(
            cfg,
            self.shared_embedding,
            encoder_fusion_factory=self.encoder_fusion_factory,
            name="decoder",
        )
        self.output_layer = self.output_layer_factory(cfg, name="output_layer")
        self.heads = {
            name: factory(cfg, name=f"head_{name}") for name, factory in self.encoder_heads
        }

    def _head_inputs(self, head: nn.Module) -> dict[str, Any]:
        """What a head gets besides the encoder outputs: the shared input embedding for heads
        that tie to it (`ties_input_embedding`, SLM's)."""
        if getattr(head, "ties_input_embedding", False):
            return {"shared_embedding": self.shared_embedding}
        return {}

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
            return_fusion_layers=self.encoder_fusion_factory is not None,
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
        if self.encoder_fusion_factory is not None:
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
            name: head(encoder_outputs, deterministic=not enable_dropout, **self._head_inputs(head))
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
