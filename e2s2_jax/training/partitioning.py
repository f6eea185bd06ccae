"""Device mesh, the logical-axis rules table, and the shardings derived from it.

The mesh has three axes: `data` (pure data parallelism: params replicated), `fsdp` (data
parallelism with params and optimizer state sharded, gathered per layer by XLA) and `model`
(tensor parallelism over heads, MLP and vocabulary). Every parameter and activation names its
logical axes; `LOGICAL_AXIS_RULES` is the only place that says where they go.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e2s2_jax.errors import ConfigError

PyTree = Any
MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axis (or axes, or None = replicated). flax applies the first rule whose
# mesh axis is not already used by another dimension of the same array.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Examples are split over every data-parallel device: both data and fsdp replicas see
    # different examples; only model-parallel devices share one.
    ("batch", ("data", "fsdp")),
    # The model dimension of every weight is sharded over fsdp (ZeRO-3 style): it is the one
    # axis every matrix has, so params and optimizer state shrink by the fsdp size.
    ("embed", "fsdp"),
    # Megatron-style tensor parallelism: the MLP hidden units, the attention heads and the
    # vocabulary (embedding rows and logits) are split over model, so each device computes a
    # slice of the wide matmuls and the logits' softmax is reduced across devices.
    ("mlp", "model"),
    ("heads", "model"),
    # The attention kernels' heads x kv columns ([embed, joined_kv]): split whenever the model
    # size divides heads * kv (inside a head when it does not divide the head count).
    ("joined_kv", "model"),
    ("vocab", "model"),
    # Head size is small (64) and contracted inside attention: splitting it would only add
    # communication, heads already carry the model split.
    ("kv", None),
    # Sequence parallelism is not used: lengths stay whole on each device.
    ("length", None),
    # The relative-position table is tiny ([buckets, heads]); its heads axis follows `heads`.
    ("relpos_buckets", None),
    # The stacked layer axis of scanned params is iterated over by lax.scan; each step needs
    # the whole layer, so it is never split.
    ("layers", None),
    # EncoderFusion's per-encoder-layer mixing weights and E2S2's 3 noise classes: tiny.
    ("encoder_layers", None),
    ("noise_classes", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def create_mesh(
    data: int = -1, fsdp: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A `Mesh` of shape `(data, fsdp, model)` with axis names `MESH_AXES`.

    One size may be -1: it takes all devices the others leave. Raises ValueError naming the sizes
    and the device count when they do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "model": model}
    num_devices = len(devices)
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(
            f"Mesh sizes {sizes}: use positive sizes, with at most one -1 (fills the rest)."
        )
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"Mesh sizes {sizes} do not fit {num_devices} devices: {num_devices} is not "
                f"divisible by {known}; choose sizes whose product divides the device count."
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"Mesh sizes {sizes} (product {math.prod(sizes.values())}) do not fit "
            f"{num_devices} devices: the product must equal the device count (set one size "
            "to -1 to fill)."
        )
    shape = tuple(sizes[name] for name in MESH_AXES)
    try:
        # Topology-aware placement on TPU/GPU (model axis on the fastest links).
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU and odd device subsets: plain order is as good as any.
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def data_parallel_size(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> int:
    """Number of batch shards: the product of the mesh axes the `batch` rule maps to."""
    return _mesh_axes_size(mesh, _logical_to_mesh_axes(("batch",), rules)[0])


def _logical_to_mesh_axes(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(names), rules)


def _mesh_axes_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[axis] for axis in axes)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops the split of any dimension the mesh axes do not divide (it stays replicated).

    jit needs every sharded dimension divisible by its shard count; a small model on a wide
    mesh (2 heads over 8 model devices) is better replicated on that axis than refused.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = [
        axes if dim % _mesh_axes_size(mesh, axes) == 0 else None
        for axes, dim in zip(entries, shape, strict=True)
    ]
    return PartitionSpec(*fitted)


def logical_param_specs(boxed_params: PyTree) -> PyTree:
    """PartitionSpecs of logical axis names, one per (unboxed) parameter leaf."""
    return nn.get_partition_spec(boxed_params)


def param_shardings(boxed_params: PyTree, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> PyTree:
    """`NamedSharding` per parameter, with the structure of `nn.unbox(boxed_params)`.

    `boxed_params` may be concrete or abstract (`jax.eval_shape` of `model.init`), with
    `nn.LogicallyPartitioned` leaves; unboxed leaves are replicated.
    """
    logical = logical_param_specs(boxed_params)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_params))
    return jax.tree.map(
        lambda spec, shape: NamedSharding(mesh, _fit_spec(spec, shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def _trailing_dict_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    keys: list[str] = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(str(entry.key))
    return tuple(reversed(keys))


def _param_path(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(entry.key) for entry in path)


def optimizer_state_shardings(
    abstract_opt_state: PyTree,
    abstract_params: PyTree,
    params_shardings: PyTree,
    mesh: Mesh,
) -> PyTree:
    """`NamedSharding` per optimizer-state leaf, following the parameter each leaf belongs to.

    A leaf is matched to a parameter by the trailing dict keys of its tree path (optax keeps
    per-parameter statistics in trees shaped like the params). A leaf with the parameter's
    shape takes its sharding (Adam moments); a leaf with one dimension fewer (Adafactor's
    factored row/column statistics) takes it with that dimension's entry removed; anything
    else (step counts, scalars) is replicated.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]] = {}
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_leaves_with_path(abstract_params),
        jax.tree.leaves(params_shardings),
        strict=True,
    ):
        by_path[_param_path(path)] = (tuple(leaf.shape), sharding.spec)

    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf_sharding(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        keys = _trailing_dict_keys(path)
        # The longest suffix that names a parameter (a state may nest params under a dict key).
        match = next((by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in by_path), None)
        if match is None or not shape:
            return replicated
        param_shape, spec = match
        entries = list(spec) + [None] * (len(param_shape) - len(spec))
        if shape == param_shape:
            return NamedSharding(mesh, _fit_spec(PartitionSpec(*entries), shape, mesh))
        if len(shape) == len(param_shape) - 1:
            for dropped in reversed(range(len(param_shape))):
                if shape == param_shape[:dropped] + param_shape[dropped + 1 :]:
                    kept = entries[:dropped] + entries[dropped + 1 :]
                    return NamedSharding(mesh, _fit_spec(PartitionSpec(*kept), shape, mesh))
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """One `NamedSharding` for every batch feature: `[batch, ...]` split over the batch axes.

    Usable as a pytree prefix for a whole batch dict in `jax.jit`'s `in_shardings`.
    """
    return NamedSharding(mesh, _logical_to_mesh_axes(("batch",), rules))


def check_batch_size(
    batch_size: int,
    mesh: Mesh | None = None,
    num_microbatches: int = 1,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    num_processes: int = 1,
    setting: str | None = None,
) -> None:
    """Raises ConfigError (a ValueError) when `batch_size` cannot be split: into equal shares
    for `num_processes` input readers, or into `num_microbatches` microbatches each split over
    `data_parallel_size(mesh)` devices. `setting` names the Gin binding (`train.batch_size`)
    in the message; the one check of the batch size every job and the train step make."""
    label = f"{setting}={batch_size}" if setting else f"Batch size {batch_size}"

    def fix(multiple: int) -> str:
        if setting:
            return f"set --gin.{setting} to a multiple of {multiple}"
        return f"Change the batch size to a multiple of {multiple}"

    if batch_size % num_processes:
        raise ConfigError(
            f"{label} is not divisible by the {num_processes} processes: {fix(num_processes)}."
        )
    if mesh is None:
        return
    shards = data_parallel_size(mesh, rules)
    needed = shards * num_microbatches
    if batch_size % needed:
        micro = num_microbatches != 1
        job = f"{setting.rsplit('.', 1)[0]}." if setting else ""
        raise ConfigError(
            f"{label} is not divisible by {needed} = data-parallel size {shards} (mesh "
            f"{dict(mesh.shape)}, batch axes {_logical_to_mesh_axes(('batch',), rules)})"
            + (f" x num_microbatches {num_microbatches}" if micro else "")
            + f". {fix(needed)}, or change the data/fsdp sizes of {job}mesh_shape"
            + (f" or {job}num_microbatches." if micro else ".")
        )


def check_batch_divisible(
    batch: Mapping[str, Any],
    mesh: Mesh,
    num_microbatches: int = 1,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> int:
    """Returns the global batch size of `batch`'s features; raises ValueError when they
    disagree or `check_batch_size` refuses it."""
    sizes = {name: np.shape(value)[0] for name, value in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"Batch features disagree on the batch size: {sizes}.")
    batch_size = next(iter(sizes.values()))
    check_batch_size(batch_size, mesh, num_microbatches, rules)
    return batch_size


def job_mesh(
    job: str,
    mesh_shape: Sequence[int],
    batch_size: int | None = None,
    num_microbatches: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """The mesh of Gin setting `{job}.mesh_shape` (`create_mesh`'s sizes) over `devices` (all
    of JAX's by default), for a job that uses `LOGICAL_AXIS_RULES`; given `batch_size`
    (`{job}.batch_size`), checks the mesh splits it. Raises ConfigError naming the setting when
    either does not fit."""
    try:
        mesh = create_mesh(*mesh_shape, devices=devices)
    except ValueError as error:
        raise ConfigError(f"{job}.mesh_shape={tuple(mesh_shape)}: {error}") from error
    if batch_size is not None:
        check_batch_size(batch_size, mesh, num_microbatches, setting=f"{job}.batch_size")
    return mesh


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> dict[str, jax.Array]:
    """Global `jax.Array`s from this process's rows of the batch (all rows on one host).

    Each process passes its own `[local_batch, ...]` slice, in process order; the result has
    `[local_batch * process_count, ...]` rows sharded by `batch_sharding`.
    """
    sharding = batch_sharding(mesh, rules)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }
