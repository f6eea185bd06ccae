"""The jitted train step: `(state, batch, rng) -> (state, metrics)` with explicit shardings.

Loss normalisation: the loss is the sum of weighted token losses divided by the sum of the
weights (`decoder_loss_weights`) over the whole global batch. With microbatches, each
microbatch's loss *sum* and gradient of that sum are accumulated and divided by the total
weight once at the end, so the result equals the full-batch gradient (not a mean of
per-microbatch means, which would weight short microbatches up).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e2s2_jax import losses
from e2s2_jax.training import partitioning
from e2s2_jax.training.train_state import TrainState, train_state_shardings

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

# Batch features the T5 loss reads; others (positions, objective extras) are passed through.
TARGET_FEATURES = ("decoder_target_tokens", "decoder_loss_weights")


def loss_sums(
    model: nn.Module,
    params: PyTree,
    batch: Batch,
    dropout_rng: jax.Array | None,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """`(loss_sum, (z_loss_sum, weight_sum))` of the T5 cross-entropy on one batch.

    Sums, not means (see the module docstring); dropout runs when `dropout_rng` is given.
    """
    logits = model.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        batch.get("encoder_segment_ids"),
        batch.get("decoder_segment_ids"),
        enable_dropout=dropout_rng is not None,
        rngs={"dropout": dropout_rng} if dropout_rng is not None else None,
    )
    loss_sum, z_loss_sum, weight_sum = losses.cross_entropy_with_logits(
        logits,
        batch["decoder_target_tokens"],
        batch.get("decoder_loss_weights"),
        z_loss=z_loss,
        label_smoothing=label_smoothing,
    )
    return loss_sum, (z_loss_sum, weight_sum)


def _split_microbatches(batch: Batch, num_microbatches: int, mesh: Mesh, rules) -> Batch:
    """`[batch, ...]` -> `[num_microbatches, batch / num_microbatches, ...]`.

    Microbatch m takes rows m, m + M, m + 2M, ...: every device's local rows spread evenly over
    the microbatches, so each microbatch stays split over all data-parallel devices without
    moving data.
    """
    batch_axes = partitioning.batch_sharding(mesh, rules).spec[0]

    def split(x):
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, PartitionSpec(None, batch_axes))
        )

    return {name: split(value) for name, value in batch.items()}


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    loss_fn_kwargs: Mapping[str, Any] | None,
    mesh: Mesh,
    num_microbatches: int = 1,
    *,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    state_shardings: TrainState | None = None,
    rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
    donate_state: bool = True,
    activation_constraints: bool = True,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """One jitted, pure `(state, batch, rng) -> (new_state, metrics)`.

    Args:
      model: the Flax module (T5 interface: tokens in, logits `[batch, length, vocab]` out).
      optimizer: an optax transformation (see `optimizers.make_optimizer`).
      loss_fn_kwargs: `z_loss`, `label_smoothing` for `losses.cross_entropy_with_logits`.
      mesh: the device mesh; params, optimizer state and batch are sharded by `rules`.
      num_microbatches: gradient accumulation steps (lax.scan); the batch size must be a
        multiple of `num_microbatches * data_parallel_size(mesh)`.
      learning_rate_fn: the schedule, only to report `learning_rate` in the metrics.
      state_shardings: from `init_train_state`; derived from the model when omitted.
      donate_state: donate the input state's buffers (the caller must not reuse it).
      activation_constraints: trace with the mesh in context so the model's
        `nn.with_logical_constraint` annotations pin activation layouts. When off, XLA
        propagates layouts from the explicit param, optimizer-state, gradient and batch
        shardings alone.

    Returns:
      The jitted step, behind a shape check of the batch (`.jitted` / `.lower` reach the jit
      object itself). `rng` is a base key; the dropout key is `fold_in(rng, state.step)` (and
      the microbatch index), so a resumed run draws the same dropout masks. Metrics (float32
      scalars, replicated): `loss` (cross-entropy + z-loss per weighted token, the optimised
      quantity), `cross_entropy`, `z_loss`, `weight_sum`, `grad_norm` (global norm before
      clipping), and `learning_rate` when `learning_rate_fn` is given.
    """
    loss_fn_kwargs = dict(loss_fn_kwargs or {})
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be at least 1.")
    if state_shardings is None:
        _, state_shardings = train_state_shardings(model, optimizer, mesh, rules=rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    grad_shardings = state_shardings.params

    def grad_of_sums(params, microbatch, dropout_rng):
        (loss_sum, (z_sum, weight_sum)), grads = jax.value_and_grad(
            lambda p: loss_sums(model, p, microbatch, dropout_rng, **loss_fn_kwargs),
            has_aux=True,
        )(params)
        # Gradients stay in the params' layout (reduce-scatter, not all-reduce, under fsdp).
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return grads, jnp.stack([loss_sum, z_sum, weight_sum])

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        # The model's activation constraints use the rules and (when enabled) the mesh.
        mesh_context = (
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
            if activation_constraints
            else contextlib.nullcontext()
        )
        with nn.logical_axis_rules(rules), mesh_context:
            step_rng = jax.random.fold_in(rng, state.step)
            if num_microbatches == 1:
                grads, sums = grad_of_sums(state.params, batch, step_rng)
            else:
                microbatches = _split_microbatches(batch, num_microbatches, mesh, rules)

                def accumulate(carry, inputs):
                    grads_sum, sums_total = carry
                    index, microbatch = inputs
                    grads, sums = grad_of_sums(
                        state.params, microbatch, jax.random.fold_in(step_rng, index)
                    )
                    return (jax.tree.map(jnp.add, grads_sum, grads), sums_total + sums), None

                zeros = jax.tree.map(jnp.zeros_like, state.params)
                (grads, sums), _ = jax.lax.scan(
                    accumulate,
                    (zeros, jnp.zeros((3,), jnp.float32)),
                    (jnp.arange(num_microbatches), microbatches),
                )
            loss_sum, z_sum, weight_sum = sums[0], sums[1], sums[2]
            # d(loss_sum / W)/dp = d(loss_sum)/dp / W: the weights do not depend on params.
            normaliser = jnp.where(weight_sum > 0, weight_sum, 1.0)
            grads = jax.tree.map(lambda g: g / normaliser, grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / normaliser,
            "cross_entropy": (loss_sum - z_sum) / normaliser,
            "z_loss": z_sum / normaliser,
            "weight_sum": weight_sum,
            "grad_norm": optax.global_norm(grads),
        }
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    jitted_step = jax.jit(
        train_step,
        in_shardings=(
            state_shardings,
            partitioning.batch_sharding(mesh, rules),
            replicated,
        ),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate_state else (),
    )

    def checked_train_step(state: TrainState, batch: Batch, rng: jax.Array):
        # jit rejects an indivisible batch against in_shardings before tracing, with a message
        # about tiling factors; this shape-only check says what to change instead.
        partitioning.check_batch_divisible(batch, mesh, num_microbatches, rules)
        return jitted_step(state, batch, rng)

    # The jitted function itself, for ahead-of-time lowering (`.lower(...).compile()`).
    checked_train_step.jitted = jitted_step
    checked_train_step.lower = jitted_step.lower
    return checked_train_step
