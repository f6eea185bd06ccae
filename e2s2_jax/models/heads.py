"""Pretraining-only encoder heads: the per-position classifier (E2S2's 3-way denoising head,
RTS's 2-way replaced-token head, the same-document pair classifier), SLM's vocabulary head, and
E2S2's contrastive pooling.

Heads are modules plugged into `T5(config, encoder_heads=(("denoise", DenoisingHead),))`: their
parameters live under `head_<name>` and are dropped by fine-tuning and export. The contrastive
"head" has no parameters (no projection, as in the reference), so it is a function the objective
applies to `intermediates["encoder"]`: pooling per packed segment needs the batch's segment ids,
which the model's head hook does not see.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from e2s2_jax.models.config import T5Config, activation_fn
from e2s2_jax.models.layers import RMSNorm, dense_rows
from e2s2_jax.models.t5 import EncoderOutputs

Array = jax.Array

# Noise labels of E2S2's view N: 0 untouched, 1 moved by the trigram shuffle, 2 replaced.
NUM_NOISE_CLASSES = 3


class DenoisingHead(nn.Module):
    """Dropout, then a dense `d_model -> num_classes` layer with bias: per-position label logits
    `[batch, length, num_classes]` (float32) from the final encoder output `[batch, length,
    embed]`. `num_classes`: 3 for E2S2's noise labels, 2 for RTS / C-RTS (original, replaced).

    The kernel is initialised normal(0.02) and the bias zeros (as the reference's BERT-style
    init). The dropout is the head's own (0.1), independent of `T5Config.dropout_rate`.
    """

    config: T5Config
    dropout_rate: float = 0.1
    num_classes: int = NUM_NOISE_CLASSES

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"DenoisingHead.num_classes={self.num_classes}: use 2 or more.")
        super().__post_init__()

    @nn.compact
    def __call__(self, encoder_outputs: EncoderOutputs, deterministic: bool = True) -> Array:
        cfg = self.config
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "noise_classes")),
            (cfg.d_model, self.num_classes),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("noise_classes",)),
            (self.num_classes,),
            jnp.float32,
        )
        hidden = nn.Dropout(self.dropout_rate)(encoder_outputs.encoded, deterministic=deterministic)
        dtype = cfg.activation_dtype
        logits = dense_rows(hidden.astype(dtype), kernel.astype(dtype))
        return logits.astype(jnp.float32) + bias


class RTSHead(DenoisingHead):
    """RTS / C-RTS's head: `DenoisingHead` with two classes, 0 original and 1 replaced."""

    num_classes: int = 2


class SameDocumentHead(DenoisingHead):
    """The same-document task's 3-way pair classifier (same paragraph, same document, different
    document) on the mean-pooled encoder output of each packed example: per-position logits
    `[batch, length, 3]` that the objective averages over each example's non-pad positions
    (`segment_mean_pool`). A dense layer commutes with the mean, so this is the dense layer
    (with bias) applied to the mean-pooled encoder output, with dropout at each position; the
    pooling needs the batch's segment ids, which the model's head hook does not see."""

    num_classes: int = 3


@struct.dataclass
class SLMOutputs:
    """What `SLMHead` hands the objective: `hidden` `[batch, length, embed]` (the transformed
    encoder output), the tied input `embedding` `[vocab, embed]` and the output `bias` `[vocab]`.
    `slm_logits` turns them into logits at the positions the objective picks, so a loss on a few
    positions need not compute the vocabulary logits of every position."""

    hidden: Array
    embedding: Array
    bias: Array


class SLMHead(nn.Module):
    """SLM's head: predicts the original token at swapped positions from the final encoder output
    through the tied input embedding (BERT's MLM head on T5's stack): a dense `d_model ->
    d_model` layer (normal(0.02)), the model's activation (GELU for T5 1.1), an RMS norm, then
    logits `hidden @ embedding.T * d_model**-0.5 + bias` (`slm_logits`). The scale puts logits
    at unit scale for T5's normal(1.0) embedding. Returns `SLMOutputs`.

    `T5` passes its shared input embedding to heads with `ties_input_embedding`.
    """

    config: T5Config
    ties_input_embedding: ClassVar[bool] = True

    @nn.compact
    def __call__(
        self,
        encoder_outputs: EncoderOutputs,
        deterministic: bool = True,
        *,
        shared_embedding: nn.Module,
    ) -> SLMOutputs:
        del deterministic  # no dropout of its own
        cfg = self.config
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "mlp")),
            (cfg.d_model, cfg.d_model),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
            (cfg.vocab_size,),
            jnp.float32,
        )
        dtype = cfg.activation_dtype
        hidden = dense_rows(encoder_outputs.encoded.astype(dtype), kernel.astype(dtype))
        hidden = activation_fn(cfg.feed_forward_proj)(hidden)
        hidden = RMSNorm(cfg, name="norm")(hidden)
        return SLMOutputs(hidden=hidden, embedding=shared_embedding.embedding, bias=bias)


def slm_logits(outputs: SLMOutputs, hidden: Array | None = None) -> Array:
    """float32 `[..., vocab]` logits of SLM's head for `hidden` `[..., embed]` (rows of
    `outputs.hidden`, or all of it when None)."""
    hidden = outputs.hidden if hidden is None else hidden
    embed = hidden.shape[-1]
    rows = hidden.reshape(-1, embed) * embed**-0.5
    logits = jnp.dot(rows, outputs.embedding.astype(rows.dtype).T)
    return logits.reshape(*hidden.shape[:-1], -1).astype(jnp.float32) + outputs.bias


def l2_normalize(x: Array, axis: int = -1) -> Array:
    """`x / ||x||` along `axis` (zero vectors stay zero), in float32."""
    x = x.astype(jnp.float32)
    squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, 1e-24))


def segment_membership(mask: Array, segment_ids: Array | None, max_segments: int) -> Array:
    """`[batch, length, max_segments]` float32 one-hot of each non-pad position's segment slot
    (slot `s` is segment id `s + 1`; rows without segment ids are one segment)."""
    if segment_ids is None:
        segment_ids = jnp.ones(mask.shape, jnp.int32)
    slots = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    return ((segment_ids[:, :, None] == slots) & mask[:, :, None]).astype(jnp.float32)


def segment_mean_pool(
    encoded: Array, mask: Array, segment_ids: Array | None, max_segments: int
) -> tuple[Array, Array]:
    """Masked mean of `encoded` `[batch, length, embed]` over each packed segment's non-pad
    positions.

    Args:
      encoded: `[batch, length, embed]` encoder outputs.
      mask: `[batch, length]` true at non-pad positions.
      segment_ids: `[batch, length]` packed segment ids (1, 2, ... per row, 0 at padding), or
        None for unpacked rows (one example per row).
      max_segments: static number of segment slots per row; slot `s` holds segment `s + 1`.
        Segments beyond it are not pooled (see `dropped_segments`).

    Returns:
      `(pooled, valid)`: `[batch, max_segments, embed]` float32 means (0 in empty slots) and
      `[batch, max_segments]` bool, true where the slot holds at least one position.
    """
    membership = segment_membership(mask, segment_ids, max_segments)
    sums = jnp.einsum("bls,bld->bsd", membership, encoded.astype(jnp.float32))
    counts = jnp.sum(membership, axis=1)
    pooled = sums / jnp.maximum(counts, 1.0)[:, :, None]
    return pooled, counts > 0


def dropped_segments(mask: Array, segment_ids: Array | None, max_segments: int) -> Array:
    """Number of packed segments (over the batch) past `max_segments`, which are not pooled."""
    if segment_ids is None:
        return jnp.zeros((), jnp.float32)
    last_segment = jnp.max(jnp.where(mask, segment_ids, 0), axis=1)
    return jnp.sum(jnp.maximum(last_segment - max_segments, 0)).astype(jnp.float32)


def contrastive_embeddings(
    encoder_outputs: EncoderOutputs, segment_ids: Array | None, max_segments: int
) -> tuple[Array, Array]:
    """E2S2's contrastive representation: the masked mean pool of the final encoder output
    per packed segment, L2-normalised. Returns `([batch, max_segments, embed], valid
    [batch, max_segments])`; see `segment_mean_pool`."""
    pooled, valid = segment_mean_pool(
        encoder_outputs.encoded, encoder_outputs.mask, segment_ids, max_segments
    )
    return l2_normalize(pooled), valid
