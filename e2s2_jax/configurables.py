"""Registers this project's public knobs with Gin. Only entry points (and tests) import it, so
that models, losses and training import without gin-config."""

import gin
import optax

from e2s2_jax import decoding, objectives
from e2s2_jax.data import feature_converters
from e2s2_jax.models import config, encoder_fusion, fusion, heads, t5
from e2s2_jax.training import optimizers

gin.external_configurable(config.T5Config, module="e2s2_jax")
gin.external_configurable(t5.T5, module="e2s2_jax")
gin.external_configurable(decoding.DecodeConfig, module="e2s2_jax")
gin.external_configurable(objectives.Seq2SeqObjective, module="e2s2_jax")
gin.external_configurable(feature_converters.E2S2EncDecFeatureConverter, module="e2s2_jax")
gin.external_configurable(optimizers.make_optimizer, module="e2s2_jax")
gin.external_configurable(optimizers.rsqrt_schedule, module="e2s2_jax")
gin.external_configurable(optimizers.warmup_linear_decay, module="e2s2_jax")
gin.external_configurable(
    optimizers.warmup_cosine_decay_schedule, "warmup_cosine_decay_schedule", module="optax"
)
gin.external_configurable(optax.constant_schedule, module="optax")
gin.external_configurable(objectives.E2S2Objective, module="e2s2_jax")
gin.external_configurable(heads.DenoisingHead, module="e2s2_jax")
gin.external_configurable(heads.RTSHead, module="e2s2_jax")
gin.external_configurable(heads.SLMHead, module="e2s2_jax")
gin.external_configurable(heads.SameDocumentHead, module="e2s2_jax")
gin.external_configurable(fusion.SurfaceFusion, module="e2s2_jax")
gin.external_configurable(encoder_fusion.LayerAttention, module="e2s2_jax")
gin.external_configurable(encoder_fusion.FineGrainedLayerAttention, module="e2s2_jax")
gin.external_configurable(encoder_fusion.LayerwiseCoordination, module="e2s2_jax")
