"""Registers this project's public knobs with Gin. Only entry points (and tests) import it, so
that models, losses and training import without gin-config."""

import gin
from e2s2_jax import decoding
from e2s2_jax.models import t5

gin.external_configurable(t5.T5Config, module="e2s2_jax")
gin.external_configurable(t5.T5, module="e2s2_jax")
gin.external_configurable(decoding.DecodeConfig, module="e2s2_jax")
