"""A learning-rate schedule that is sane for `good_steps` updates and then 1e30, for the tests of
the trainer's non-finite guard (a Gin `import exploding_lr` line registers it)."""

import gin
import jax.numpy as jnp


@gin.configurable
def exploding_schedule(good_steps: int = 10, good_value: float = 1e-3, bad_value: float = 1e30):
    return lambda count: jnp.where(count < good_steps, good_value, bad_value)
