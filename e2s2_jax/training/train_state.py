"""The train state (step, params, optimizer state), its shardings, and sharded initialisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e2s2_jax.models import sigma_reparam
from e2s2_jax.training import partitioning

PyTree = Any

# Inputs `model.init` needs; the T5 parameters do not depend on their lengths.
INIT_FEATURES = ("encoder_input_tokens", "decoder_input_tokens")


class TrainState(struct.PyTreeNode):
    """step: int32 scalar, the number of updates applied. params: unboxed float32 parameters.
    opt_state: the optax state for `params`. model_state: non-trainable collections the train
    step advances (sigmaReparam's power-iteration vectors, `models/sigma_reparam.py`); `{}`
    for a plain model."""

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    model_state: PyTree = struct.field(default_factory=dict)


def _init_inputs(input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, jax.Array]:
    shapes = dict(input_shapes or {})
    return {name: jnp.ones(tuple(shapes.get(name, (1, 1))), jnp.int32) for name in INIT_FEATURES}


def _boxed_params(model: nn.Module, rng: jax.Array, inputs: Mapping[str, jax.Array]) -> PyTree:
    return model.init(rng, inputs["encoder_input_tokens"], inputs["decoder_input_tokens"])["params"]


def abstract_boxed_params(
    model: nn.Module, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> PyTree:
    """The model's params as `nn.Partitioned` boxes of `jax.ShapeDtypeStruct`s (no
    allocation): shapes, dtypes and logical axes."""
    inputs = _init_inputs(input_shapes)
    return jax.eval_shape(lambda: _boxed_params(model, jax.random.key(0), inputs))


def abstract_boxed_train_params(
    model: nn.Module, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[PyTree, PyTree]:
    """`(params, model_state)` the train state holds, boxed and abstract: the model's params,
    plus sigmaReparam's gammas and power-iteration vectors when the config asks for them."""
    boxed = abstract_boxed_params(model, input_shapes)
    if not sigma_reparam.enabled(model):
        return boxed, {}
    return sigma_reparam.boxed(boxed)


def train_state_shardings(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
) -> tuple[TrainState, TrainState]:
    """`(abstract_state, state_shardings)`: a TrainState of `jax.ShapeDtypeStruct`s and one of
    `NamedSharding`s, derived from the params' logical axes without allocating anything.

    `input_shapes` maps `INIT_FEATURES` to `[batch, length]`; (1, 1) when omitted.
    """
    boxed, boxed_model_state = abstract_boxed_train_params(model, input_shapes)
    abstract_params = nn.unbox(boxed)
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    params_shardings = partitioning.param_shardings(boxed, mesh, rules)
    opt_shardings = partitioning.optimizer_state_shardings(
        abstract_opt_state, abstract_params, params_shardings, mesh
    )
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt_state,
        model_state=nn.unbox(boxed_model_state),
    )
    shardings = TrainState(
        step=NamedSharding(mesh, PartitionSpec()),
        params=params_shardings,
        opt_state=opt_shardings,
        model_state=partitioning.param_shardings(boxed_model_state, mesh, rules),
    )
    return abstract_state, shardings


def init_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rules: partitioning.Rules = partitioning.LOGICAL_AXIS_RULES,
) -> tuple[TrainState, TrainState]:
    """`(state, state_shardings)`: a fresh TrainState at step 0, created directly in its
    sharded layout (jit with `out_shardings`: no device ever holds the full params).

    `input_shapes` maps `INIT_FEATURES` to `[batch, length]` (any small shape works for T5).
    """
    _, shardings = train_state_shardings(model, optimizer, mesh, input_shapes, rules)
    inputs = _init_inputs(input_shapes)

    def init(rng: jax.Array) -> TrainState:
        params = nn.unbox(_boxed_params(model, rng, inputs))
        model_state = {}
        if sigma_reparam.enabled(model):
            params, model_state = sigma_reparam.reparametrise(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            model_state=model_state,
        )

    state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings
