"""EncoderFusion baselines (METHODS.md section 3): what each decoder layer cross-attends in place
of the encoder's final output.

Plug one in with `T5(config, encoder_fusion_factory=LayerAttention)` (Gin:
`T5.encoder_fusion_factory = @LayerAttention`, as the `gin/models/encoder_fusion_*.gin` files
do). T5 then has the encoder return `EncoderOutputs.fusion_layers`, `[batch, layers + 1, length,
embed]`: the embedding and every encoder layer's output, each through the encoder's final norm.
Every decoder layer builds `factory(config, name="encoder_layer_attention")` (the parameter path
checkpoints use) and calls it as `fusion(encoder_layers, decoder_layer)`, with `decoder_layer`
its 0-based index (an int32 scalar when the layers are scanned); it returns that layer's
cross-attention memory `[batch, length, embed]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2s2_jax.models.config import T5Config

Array = jax.Array


class LayerAttention(nn.Module):
    """A learned softmax-weighted sum of the encoder's layers, the embedding layer included, one
    weight per layer and decoder layer. The weights start at zero, i.e. a uniform average.
    Parameter: `layer_scores` `[layers + 1]`."""

    config: T5Config

    def score_shape(self, num_layers: int, d_model: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The shape of `layer_scores` and its logical axes."""
        del d_model
        return (num_layers,), ("encoder_layers",)

    @nn.compact
    def __call__(self, encoder_layers: Array, decoder_layer: Array | int) -> Array:
        """`[batch, layers + 1, length, embed]` -> `[batch, length, embed]`."""
        del decoder_layer  # Each decoder layer has its own scores.
        num_layers, d_model = encoder_layers.shape[1], encoder_layers.shape[-1]
        shape, axes = self.score_shape(num_layers, d_model)
        scores = self.param(
            "layer_scores", nn.with_logical_partitioning(nn.initializers.zeros, axes), shape
        )
        weights = jax.nn.softmax(scores, axis=0).astype(encoder_layers.dtype)
        if weights.ndim == 1:
            weights = weights[:, None]
        return jnp.sum(encoder_layers * weights[None, :, None, :], axis=1)


class FineGrainedLayerAttention(LayerAttention):
    """Layer attention with one weight per encoder layer and model dimension (a softmax over the
    layers for each dimension). Parameter: `layer_scores` `[layers + 1, embed]`."""

    def score_shape(self, num_layers: int, d_model: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
        return (num_layers, d_model), ("encoder_layers", "embed")


def coordinated_encoder_layer(decoder_layer, num_encoder_layers: int, num_decoder_layers: int):
    """Layer-wise coordination: the index into `EncoderOutputs.fusion_layers` (0 = embedding)
    that decoder layer `decoder_layer` (0-based; an int or an integer array) attends: encoder
    layer j for decoder layer j at equal depths, proportionally (rounded up) otherwise, so the
    last attends the last."""
    return -(-(decoder_layer + 1) * num_encoder_layers // num_decoder_layers)


class LayerwiseCoordination(nn.Module):
    """Decoder layer j cross-attends encoder layer j (`coordinated_encoder_layer` when the
    depths differ). No parameters."""

    config: T5Config

    def __call__(self, encoder_layers: Array, decoder_layer: Array | int) -> Array:
        """`[batch, layers + 1, length, embed]` -> `[batch, length, embed]`."""
        cfg = self.config
        index = coordinated_encoder_layer(
            decoder_layer, cfg.num_encoder_layers, cfg.num_decoder_layers
        )
        return jax.lax.dynamic_index_in_dim(encoder_layers, index, axis=1, keepdims=False)


# The baselines by the name of their Gin file (`gin/models/encoder_fusion_<name>.gin`).
ENCODER_FUSIONS: dict[str, type[nn.Module]] = {
    "layer_attention": LayerAttention,
    "fine_grained_layer_attention": FineGrainedLayerAttention,
    "layerwise_coordination": LayerwiseCoordination,
}


def check_encoder_fusion_factory(factory: object) -> None:
    """Returns when `factory` is None or callable (a module class, a partial, a Gin reference);
    otherwise raises ValueError naming the setting, the baselines there are and how to choose
    one (the setting was a string once: `"layer_attention"`, ...)."""
    if factory is None or callable(factory):
        return
    available = ", ".join(cls.__name__ for cls in ENCODER_FUSIONS.values())
    fix = (
        f"pass one of {available} (e2s2_jax/models/encoder_fusion.py; Gin: "
        "`T5.encoder_fusion_factory = @LayerAttention`, or include "
        "gin/models/encoder_fusion_<name>.gin), another callable that builds the module as "
        "`factory(config, name=...)`, or None for plain T5"
    )
    for gin_name, cls in ENCODER_FUSIONS.items():
        if isinstance(factory, str) and factory in (gin_name, cls.__name__):
            fix = (
                f"pass the class {cls.__name__}, not its name (Gin: `T5.encoder_fusion_factory "
                f"= @{cls.__name__}`, as gin/models/encoder_fusion_{gin_name}.gin does); the "
                f"baselines are {available}"
            )
    raise ValueError(f"T5.encoder_fusion_factory={factory!r} is not a module factory: {fix}.")
