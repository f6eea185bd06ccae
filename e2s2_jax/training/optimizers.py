"""Optimizers (optax) and learning-rate schedules for T5 pretraining.

- `adafactor`: t5x's T5 1.1 recipe (decay 0.8, update clipping 1.0, factored second moments,
  parameter-scale-relative steps, no momentum), usually with `rsqrt_schedule`.
- `adamw_rms_scaled`: nanoT5's AdamW whose step for each parameter is scaled by that
  parameter's RMS (as Adafactor does), which converges where plain AdamW diverges on T5.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

from e2s2_jax.errors import ConfigError

Schedule = Callable[[int], float]


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> optax.Schedule:
    """t5x's `rsqrt_decay`: `lr(step) = base / sqrt(max(step, warmup_steps))`.

    Constant at `base / sqrt(warmup_steps)` (0.01 for t5x's 10k) during warm-up, then decays as
    the inverse square root of the step. Returns a float32 scalar per step.
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps={warmup_steps} must be at least 1.")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return base_learning_rate * jnp.reciprocal(jnp.sqrt(jnp.maximum(step, warmup_steps)))

    return schedule


def warmup_linear_decay(
    peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0
) -> optax.Schedule:
    """Linear warm-up from 0 to `peak_value` over `warmup_steps`, then linear decay to
    `end_value` at step `decay_steps` (E2S2's continued-pretraining schedule)."""
    if not 0 <= warmup_steps < decay_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 0 and below decay_steps={decay_steps}."
        )
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak_value, warmup_steps),
            optax.linear_schedule(peak_value, end_value, decay_steps - warmup_steps),
        ],
        boundaries=[warmup_steps],
    )


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> optax.Schedule:
    """optax's warm-up + cosine schedule (registered under its name, `optax.`), refusing
    `decay_steps` (the total, TRAIN_STEPS in gin/runs/adamw.gin) at or below `warmup_steps`
    with the bindings to change, where optax fails later on a negative cosine length."""
    if not 0 <= warmup_steps < decay_steps:
        raise ConfigError(
            f"optax.warmup_cosine_decay_schedule: warmup_steps={warmup_steps} must be >= 0 and "
            f"below decay_steps={decay_steps} (the run's TRAIN_STEPS with gin/runs/adamw.gin): "
            "raise --gin.TRAIN_STEPS or lower "
            "--gin.optax.warmup_cosine_decay_schedule.warmup_steps."
        )
    return optax.warmup_cosine_decay_schedule(
        init_value, peak_value, warmup_steps, decay_steps, end_value, exponent
    )


def adafactor(
    learning_rate: optax.ScalarOrSchedule,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    min_dim_size_to_factor: int = 128,
    multiply_by_parameter_scale: bool = True,
    weight_decay_rate: float | None = None,
) -> optax.GradientTransformation:
    """Adafactor with t5x's T5 1.1 defaults (epsilon1 1e-30, epsilon2 / min scale 1e-3).

    Second moments of matrices with both dimensions at least `min_dim_size_to_factor` are
    factored into row and column statistics (of a parameter's two largest dimensions; a
    scanned layer axis is the smaller third); there is no first moment. T5's attention kernels
    are stored `[embed, heads * kv]`, so they are factored over embed and the joined heads, as
    t5x's logical factor rules do.
    """
    return optax.adafactor(
        learning_rate=learning_rate,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate,
        decay_offset=0,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold,
        momentum=None,
        weight_decay_rate=weight_decay_rate,
        eps=1e-30,
        factored=True,
    )


def adamw_rms_scaled(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    min_rms_scale: float = 1e-3,
) -> optax.GradientTransformation:
    """AdamW whose update of each parameter is scaled by `max(min_rms_scale, RMS(param))`.

    Update: `-lr * (adam_direction * max(1e-3, rms(param)) + weight_decay * param)`, with
    bias-corrected Adam moments; the weight decay is decoupled and not RMS-scaled (nanoT5).
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.scale_by_param_block_rms(min_scale=min_rms_scale),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


OPTIMIZERS = {"adafactor": adafactor, "adamw_rms_scaled": adamw_rms_scaled}


def make_optimizer(
    name: str,
    learning_rate_schedule: optax.ScalarOrSchedule,
    *,
    gradient_clip_norm: float | None = None,
    **kwargs,
) -> optax.GradientTransformation:
    """The optimizer `name` (one of `OPTIMIZERS`), optionally after global-norm clipping.

    `kwargs` go to the optimizer's function (e.g. `decay_rate`, `weight_decay`).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; use one of {sorted(OPTIMIZERS)}.")
    optimizer = OPTIMIZERS[name](learning_rate_schedule, **kwargs)
    if gradient_clip_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(gradient_clip_norm), optimizer)
    return optimizer
