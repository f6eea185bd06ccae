"""The jitted train step: `(state, batch, rng) -> (state, metrics)` with explicit shardings.

Loss normalisation: the objective's normalizers (e.g. the number of weighted target tokens) are
computed once on the whole global batch, and each microbatch's loss is its terms divided by
those global normalizers. Summing microbatch losses, gradients and metrics therefore gives
exactly the full-batch values (not a mean of per-microbatch means, which would weight short
microbatches up). See `e2s2_jax/objectives.py`.
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

from e2s2_jax import objectives
from e2s2_jax.models import sigma_reparam
from e2s2_jax.models.attention_entropy import finish_entropy_metrics
from e2s2_jax.training import partitioning
from e2s2_jax.training.train_state import TrainState, train_state_shardings

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


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
    objective: objectives.Objective,
    mesh: Mesh,
    num_microbatches: int = 1,
    *,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    state_shardings: TrainState | None = None,
    rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
    donate_state: bool = True,
    activation_constraints: bool = True,
    attention_entropy: bool = False,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """One jitted, pure `(state, batch, rng) -> (new_state, metrics)`.

    Args:
      model: the Flax module (T5 interface: tokens in, logits `[batch, length, vocab]` out).
      optimizer: an optax transformation (see `optimizers.make_optimizer`).
      objective: what to differentiate (`objectives.Seq2SeqObjective()` for T5's loss).
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
      attention_entropy: the entropy variant of the step: the same update, plus every
        attention layer's entropy in the metrics (`attention_entropy/<kind>/layer_<i>` and
        `attention_entropy/<kind>`, `models/attention_entropy.py`). A separate program, so
        that the plain step's stays exactly what it was: the trainer runs this one every
        `train.attention_entropy_every` steps and the plain one otherwise.

    Returns:
      The jitted step, behind a shape check of the batch (`.jitted` / `.lower` reach the jit
      object itself). `rng` is a base key; the dropout key is `fold_in(rng, state.step)` (and
      the microbatch index), so a resumed run draws the same dropout masks. Metrics (float32
      scalars, replicated): the objective's metrics and normalizers, `grad_norm` (global
      norm before clipping), `nonfinite` (1.0 when the loss or the gradient norm was not
      finite, and the update was therefore not applied), and `learning_rate` when
      `learning_rate_fn` is given.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be at least 1.")
    if state_shardings is None:
        _, state_shardings = train_state_shardings(model, optimizer, mesh, rules=rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    grad_shardings = state_shardings.params

    # Only the entropy variant passes the flag: an objective of another team's need not know it.
    objective_kwargs = {"attention_entropy": True} if attention_entropy else {}

    reparametrised = sigma_reparam.enabled(model)

    def grad_of_loss(params, microbatch, normalizers, dropout_rng, vectors):
        def loss_fn(params):
            if reparametrised:  # the model sees W_hat; the gradient reaches W and gamma
                params = sigma_reparam.effective_params(params, vectors)
            return objective(
                model, params, microbatch, normalizers, dropout_rng, **objective_kwargs
            )

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # Gradients stay in the params' layout (reduce-scatter, not all-reduce, under fsdp).
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
        return grads, metrics

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        # The model's activation constraints use the rules and (when enabled) the mesh.
        mesh_context = (
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
            if activation_constraints
            else contextlib.nullcontext()
        )
        with nn.logical_axis_rules(rules), mesh_context:
            step_rng = jax.random.fold_in(rng, state.step)
            normalizers = objective.normalizers(batch)
            # sigmaReparam's power-iteration step: once per step, shared by the microbatches.
            vectors = (
                sigma_reparam.power_iteration(state.params, state.model_state)
                if reparametrised
                else None
            )
            if num_microbatches == 1:
                grads, metrics = grad_of_loss(state.params, batch, normalizers, step_rng, vectors)
            else:
                microbatches = _split_microbatches(batch, num_microbatches, mesh, rules)

                def accumulate(carry, inputs):
                    index, microbatch = inputs
                    grads, metrics = grad_of_loss(
                        state.params,
                        microbatch,
                        normalizers,
                        jax.random.fold_in(step_rng, index),
                        vectors,
                    )
                    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

                zeros = jax.eval_shape(
                    grad_of_loss,
                    state.params,
                    jax.tree.map(lambda x: x[0], microbatches),
                    normalizers,
                    step_rng,
                    vectors,
                )
                zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
                (grads, metrics), _ = jax.lax.scan(
                    accumulate, zeros, (jnp.arange(num_microbatches), microbatches)
                )
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # A non-finite loss or gradient is never applied: the step keeps its params and
            # optimizer state (and still counts, so the data position and dropout keys move on).
            # The predicate is two scalars known before the update, so the select fuses into
            # the update's elementwise pass: no second copy of the state.
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            model_state = sigma_reparam.advanced_state(vectors) if reparametrised else {}
            params, opt_state, model_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state, model_state),
                (state.params, state.opt_state, state.model_state),
            )
        if attention_entropy:
            metrics = finish_entropy_metrics(metrics)
        metrics = {
            **metrics,
            **{name: jnp.asarray(value, jnp.float32) for name, value in normalizers.items()},
            "grad_norm": grad_norm,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
        )
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
