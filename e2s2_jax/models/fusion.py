"""SurfaceFusion (METHODS.md section 3): an output layer that fuses the decoder's distribution
with one read from the source tokens' surface embeddings.

At every decoder position, with `h` the decoder's final output `[batch, length, embed]`:
`r = Attention(q=stop_gradient(h), k=stop_gradient(encoder output), v=source embeddings)`,
`z_dec = head(f(h))`, `z_src = head(f(r))` with `f(z) = z + W2 relu(W1 z)` (W2 zero-initialised)
and `head` the model's own output projection, then a fusion mode (`fuse_log_probs`).

Plug it in with `T5(config, output_layer_factory=SurfaceFusion)` (or a `functools.partial` of
it). The model then returns fused log-probability scores `[batch, length, vocab]` instead of
logits. As in the reference (fairseq `get_normalized_probs`), the same score is the training
loss and the decoding score:
- "hard" and "gate" (by default, `renormalize=False`): the score is used as is, never
  renormalised. The loss (`losses.label_smoothed_nll`, chosen by the objectives through
  `scores_used_as_is`) is minus the score at the target, i.e. `lam * NLL_dec + (1 - lam) *
  NLL_src`, a weighted sum of the two paths' NLLs (each path learns the target on its own:
  this is how the source path trains the embeddings), with fairseq's label smoothing on the
  score. The score's `exp` sums to at most 1 (Hoelder), so it is not a softmax's logits and
  t5x's z-loss has no meaning on it: none is added. Decoding (`e2s2_jax.decoding`) ranks by
  the score as is: beam search sums it, greedy and sampling report it per token (greedy's
  argmax is unchanged; sampling draws from `exp(score)` normalised, as any sampler must).
- "hard" and "gate" with `renormalize=True` (Gin: `SurfaceFusion.renormalize = True`): the
  score is treated as logits, as the project did before: the loss is the softmax
  cross-entropy `-fused[target] + logsumexp(fused)` of the renormalised geometric mixture (a
  product of experts, a different objective from the reference's; the z-loss adds `z *
  logsumexp**2`, a pull towards agreement of the two paths) and decoding scores with
  `log_softmax(fused)`.
- "soft" and "postnorm" end in a `log_softmax`: their score is normalised, consumers treat it
  as logits (cross-entropy, `log_softmax` in decoding), which leaves it unchanged (the
  cross-entropy's `logsumexp` and z-loss are 0). `renormalize` does not apply to them.

Parameters (besides the unchanged `output_layer/logits_dense/kernel` of the plain head):
`surface_attention/{query,key,value,out}/kernel`, `residual_ffn/{wi,wo}/kernel` and, for
"gate", `gate/{decoder,source}_weights`. Zero-initialised `wo` makes `f` the identity at step
0, so adding SurfaceFusion with "hard" and `lam=1` to a pretrained T5 leaves it unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2s2_jax.models.attention import attention_mask_bias, cache_once
from e2s2_jax.models.config import T5Config
from e2s2_jax.models.layers import Projection, dense_rows
from e2s2_jax.models.t5 import EncoderOutputs, OutputProjection

Array = jax.Array

FUSION_MODES = ("hard", "soft", "postnorm", "gate")
# The modes whose fused score is not normalised (a weighted sum of two log-softmaxes).
UNNORMALIZED_MODES = ("hard", "gate")

# The "cache" variables the surface attention projects once per decode (source keys, values).
SURFACE_ATTENTION_CACHE = ("source_key", "source_value")


def fuse_log_probs(
    mode: str,
    decoder_logits: Array,
    source_logits: Array,
    *,
    lam: float = 0.8,
    tau: float = 1.0,
    gate: Array | None = None,
) -> Array:
    """The fused score `[..., vocab]` of `z_dec = decoder_logits` and `z_src = source_logits`:

    hard:     lam * log_softmax(z_dec) + (1 - lam) * log_softmax(z_src)
    soft:     log_softmax(z_dec + log_softmax(tau * z_src))
    postnorm: log_softmax(log_softmax(z_dec) + log_softmax(tau * z_src))
    gate:     as hard, with `gate` `[...]` (per position, in (0, 1)) in place of lam.

    "soft" and "postnorm" are normalised; the "hard"/"gate" score's `exp` sums to at most 1,
    and the loss and decoding use it as is (see the module docstring).
    """
    log_softmax = jax.nn.log_softmax
    if mode == "hard":
        return lam * log_softmax(decoder_logits) + (1.0 - lam) * log_softmax(source_logits)
    if mode == "gate":
        if gate is None:
            raise ValueError("mode='gate' needs the gate values.")
        gate = gate[..., None]
        return gate * log_softmax(decoder_logits) + (1.0 - gate) * log_softmax(source_logits)
    if mode == "soft":
        return log_softmax(decoder_logits + log_softmax(tau * source_logits))
    if mode == "postnorm":
        return log_softmax(log_softmax(decoder_logits) + log_softmax(tau * source_logits))
    raise ValueError(f"SurfaceFusion mode={mode!r}: use one of {FUSION_MODES}.")


def scores_used_as_is(model: nn.Module) -> bool:
    """Whether `model`'s outputs are log-probability scores that the loss and decoding use as
    is (SurfaceFusion "hard" or "gate" without `renormalize`), rather than logits to normalise
    (any other output layer). Reads `model.output_layer_factory` (a `T5`'s; models without one
    return logits), building an unbound output layer to see its Gin-bound settings."""
    factory = getattr(model, "output_layer_factory", None)
    if factory is None:
        return False
    layer = factory(model.config)
    return (
        isinstance(layer, SurfaceFusion)
        and layer.mode in UNNORMALIZED_MODES
        and not layer.renormalize
    )


class SurfaceAttention(nn.Module):
    """One attention head from decoder states `[batch, length, embed]` over the source:
    queries from the stopped decoder states, keys from the stopped encoder output, values from
    the source token embeddings (the only path by which gradients leave this module).

    Its inner width is `d_model`; the kernels' inner axis is named "mlp" so that it is split
    over the model-parallel mesh axis like the other wide matmuls. As in T5's attention, the
    1/sqrt(width) scaling is folded into the query init. With `decode=True` the source keys and
    values are projected once, on the call that creates the cache, and kept once per input row
    when beam search runs several beams per row.
    """

    config: T5Config
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(
        self,
        decoder_hidden: Array,
        encoder_outputs: EncoderOutputs,
        *,
        deterministic: bool = True,
        decode: bool = False,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
    ) -> Array:
        cfg = self.config
        width = cfg.d_model

        def projection(name: str, stddev: float, to_embed: bool = False) -> Projection:
            shape, axes = (cfg.d_model, width), ("embed", "mlp")
            if to_embed:
                shape, axes = (width, cfg.d_model), ("mlp", "embed")
            return Projection(shape, axes, dense_rows, stddev, cfg.activation_dtype, name=name)

        query = projection("query", (cfg.d_model * width) ** -0.5)(
            jax.lax.stop_gradient(decoder_hidden)
        )
        key_proj = projection("key", cfg.d_model**-0.5)
        value_proj = projection("value", cfg.d_model**-0.5)

        def source_keys_values():
            keys = key_proj(jax.lax.stop_gradient(encoder_outputs.encoded))
            return keys, value_proj(encoder_outputs.embedded)

        if decode:
            key, value = cache_once(self, SURFACE_ATTENTION_CACHE, source_keys_values)
        else:
            key, value = source_keys_values()

        batch, length = decoder_hidden.shape[:2]
        bias = attention_mask_bias(
            jnp.ones((batch, length), bool),
            encoder_outputs.mask,
            decoder_segment_ids,
            encoder_segment_ids,
        )[:, 0]
        # Beam search keeps the source keys/values once per input row: the `groups` adjacent
        # rows of its beams attend them as one row of `groups * length` queries.
        groups = batch // key.shape[0]
        if groups > 1:
            bias = bias.reshape(key.shape[0], groups * length, bias.shape[-1])
            query = query.reshape(key.shape[0], groups * length, query.shape[-1])
        query = nn.with_logical_constraint(query, ("batch", "length", "mlp"))
        key = nn.with_logical_constraint(key, ("batch", "length", "mlp"))
        value = nn.with_logical_constraint(value, ("batch", "length", "mlp"))
        scores = jnp.einsum("bqk,bsk->bqs", query, key, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores + bias, axis=-1).astype(cfg.activation_dtype)
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        context = jnp.einsum("bqs,bsk->bqk", weights, value)
        if groups > 1:
            context = context.reshape(batch, length, context.shape[-1])
        out = projection("out", width**-0.5, to_embed=True)(context)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class ResidualFeedForward(nn.Module):
    """`f(z) = z + W2 relu(W1 z)` on `[batch, length, embed]`, W2 initialised to zero so that
    `f` starts as the identity. Hidden width `hidden_dim` (0: the config's `d_ff`)."""

    config: T5Config
    hidden_dim: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        hidden_dim = self.hidden_dim or cfg.d_ff
        w1 = Projection(
            shape=(cfg.d_model, hidden_dim),
            axes=("embed", "mlp"),
            equation=dense_rows,
            stddev=cfg.d_model**-0.5,
            dtype=cfg.activation_dtype,
            name="wi",
        )
        w2 = Projection(
            shape=(hidden_dim, cfg.d_model),
            axes=("mlp", "embed"),
            equation=dense_rows,
            stddev=0.0,
            dtype=cfg.activation_dtype,
            kernel_init=nn.initializers.zeros,
            name="wo",
        )
        hidden = nn.with_logical_constraint(jax.nn.relu(w1(x)), ("batch", "length", "mlp"))
        out = w2(hidden)
        return (x + out).astype(cfg.activation_dtype)


class FusionGate(nn.Module):
    """`lam_t = sigmoid(w . [f(h_t); f(r_t)])`, `[batch, length]` float32. `w` starts at zero
    (lam_t = 0.5): no bias, as in the formula."""

    config: T5Config

    @nn.compact
    def __call__(self, decoder_features: Array, source_features: Array) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
        shape = (self.config.d_model,)
        decoder_weights = self.param("decoder_weights", init, shape)
        source_weights = self.param("source_weights", init, shape)
        score = jnp.einsum("bld,d->bl", decoder_features.astype(jnp.float32), decoder_weights)
        score += jnp.einsum("bld,d->bl", source_features.astype(jnp.float32), source_weights)
        return jax.nn.sigmoid(score)


class SurfaceFusion(OutputProjection):
    """The SurfaceFusion output layer: fused scores `[batch, length, vocab]` (float32).

    mode: one of `FUSION_MODES`; lam: the decoder's weight in "hard"; tau: the source logits'
    temperature in "soft" and "postnorm"; attention_dropout_rate: on the surface attention
    weights; ffn_dim: hidden width of `f` (0: `d_ff`); renormalize: "hard" and "gate" only:
    False (the reference's, default) trains and decodes on the fused score as is, True treats
    it as logits (softmax cross-entropy with z-loss, `log_softmax` in decoding; see the module
    docstring). The output is the same fused score either way; `scores_used_as_is` tells the
    objectives and decoding which one to apply.
    """

    mode: str = "hard"
    lam: float = 0.8
    tau: float = 1.0
    attention_dropout_rate: float = 0.1
    ffn_dim: int = 0
    renormalize: bool = False

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
        if self.mode not in FUSION_MODES:
            raise ValueError(f"SurfaceFusion mode={self.mode!r}: use one of {FUSION_MODES}.")
        if encoder_outputs is None:
            raise ValueError("SurfaceFusion needs the encoder outputs.")
        surface = SurfaceAttention(
            self.config, self.attention_dropout_rate, name="surface_attention"
        )(
            decoder_hidden,
            encoder_outputs,
            deterministic=deterministic,
            decode=decode,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
        )
        residual_ffn = ResidualFeedForward(self.config, self.ffn_dim, name="residual_ffn")
        decoder_features, source_features = residual_ffn(decoder_hidden), residual_ffn(surface)
        head = self._output_head(shared_embedding)
        gate = None
        if self.mode == "gate":
            gate = FusionGate(self.config, name="gate")(decoder_features, source_features)
        decoder_logits, source_logits = head(decoder_features), head(source_features)
        # Visible with `mutable=["intermediates"]` (tests, analysis); a no-op otherwise.
        self.sow("intermediates", "decoder_logits", decoder_logits)
        self.sow("intermediates", "source_logits", source_logits)
        fused = fuse_log_probs(
            self.mode,
            decoder_logits,
            source_logits,
            lam=self.lam,
            tau=self.tau,
            gate=gate,
        )
        return nn.with_logical_constraint(fused, ("batch", "length", "vocab"))
